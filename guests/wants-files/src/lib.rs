//! A hyperty that imports `wasi:filesystem` (it reads a file): refused at
//! deploy unless its domain is granted `filesystem`.

use hyperty_guest::{Guest, Message};

struct WantsFiles;

impl Guest for WantsFiles {
    fn init(_: String, _: String) -> Result<(), String> {
        Ok(())
    }
    fn handle(_: Message) {
        let _ = std::fs::read("/etc/passwd");
    }
}

hyperty_guest::export!(WantsFiles);
