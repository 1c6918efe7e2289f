// world: idp-proxy
// A JavaScript component of the wrong world for a hyperty (it is an IdP
// proxy that refuses everything): `hyperty check` and deploy must refuse it
// as a hyperty as clearly as a Rust component of another world.

export const identityProvider = {
  init() {},
  generateAssertion(user) {
    throw `no assertions for ${user}`;
  },
  validateAssertion() {
    throw "no token is valid";
  },
};
