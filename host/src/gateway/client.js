// The hyperty app-gateway JavaScript client: written by the gwbrowser helper (issue 14).
