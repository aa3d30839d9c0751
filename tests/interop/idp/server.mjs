// Test-only authorization server for m2m-client's interop tests: node oidc-provider (OpenID
// Certified), configured for the client_credentials grant with JWT access tokens (RFC 9068).
// NOT for production: keys are generated at start-up and kept in memory, secrets are fixed.
//
//   node server.mjs      -> prints "LISTENING http://127.0.0.1:PORT" once ready; the issuer is that URL
//
// Environment (all optional):
//   IDP_CLIENT_JWKS   public JWKS (JSON) of the private_key_jwt client; the test fixture generates the
//                     key pair, so no private key is ever committed. Without it, that client is left out.
//   IDP_ROTATIONS     how many key rotations to prepare (default 3).
//   IDP_ADMIN_TOKEN   when set, POST /__test__/rotate requires "Authorization: Bearer <token>".
//
// The provider also answers under the path prefixes /a|b, /%7euser and /x^y (its token endpoint
// is then <issuer><prefix>/token), for DPoP htu tests with such characters in the URL.
//
// Resources (RFC 8707 `resource`); the token's `aud` is the resource and each is signed with its own alg:
//   https://rs256.api.test/ (default when no resource is sent), https://ps256.api.test/,
//   https://es256.api.test/   -- scopes "read:data write:data" on each.
//
// DPoP (RFC 9449, features.dPoP): any client may send a DPoP proof and gets a DPoP-bound token
// (token_type "DPoP", cnf.jkt). Two more clients exist for it: "dpop-client" must send a proof
// (dpop_bound_access_tokens), "dpop-nonce-client" must also carry a server nonce (use_dpop_nonce).
import { generateKeyPair as generateKeyPairCb, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { promisify } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const RESOURCES = {
  'https://rs256.api.test/': 'RS256',
  'https://ps256.api.test/': 'PS256',
  'https://es256.api.test/': 'ES256',
};
const DEFAULT_RESOURCE = 'https://rs256.api.test/';
const RESOURCE_SCOPES = 'read:data write:data';

// oidc-provider fixes its keystore at construction, so key rotation is simulated with public APIs
// only: every generation of keys is in the keystore from the start, but /jwks publishes only the
// generations rotated in so far (newest first), and tokens are signed with the newest one's kid.
// An unpublished key is thus invisible to verifiers until POST /__test__/rotate, exactly as a real
// rotation looks from outside. Generation 0 is live at start; ROTATIONS more are held back.
const ROTATIONS = Number(process.env.IDP_ROTATIONS ?? 3);
const generateKeyPair = promisify(generateKeyPairCb); // async: keys are generated in parallel
const jwk = async (type, options, kid) => ({
  ...(await generateKeyPair(type, options)).privateKey.export({ format: 'jwk' }), kid, use: 'sig',
});
const generations = await Promise.all(Array.from({ length: ROTATIONS + 1 }, async (_, i) => ({
  // One RSA key serves RS256 and PS256 (its JWK has no `alg`, as many IdPs publish them).
  rsa: await jwk('rsa', { modulusLength: 2048 }, `rsa-${i}`),
  ec: await jwk('ec', { namedCurve: 'P-256' }, `ec-${i}`),
})));
let live = 0; // index of the newest published generation

const publishedKids = () => new Set(generations.slice(0, live + 1).flatMap((g) => [g.rsa.kid, g.ec.kid]));

const clients = [
  { client_id: 'basic-client', client_secret: 'basic-secret', token_endpoint_auth_method: 'client_secret_basic' },
  { client_id: 'post-client', client_secret: 'post-secret', token_endpoint_auth_method: 'client_secret_post' },
];
// DPoP clients (client_secret_basic). Nonces are HMACs of the time step under this secret.
clients.push(
  { client_id: 'dpop-client', client_secret: 'dpop-secret', token_endpoint_auth_method: 'client_secret_basic', dpop_bound_access_tokens: true },
  { client_id: 'dpop-nonce-client', client_secret: 'dpop-nonce-secret', token_endpoint_auth_method: 'client_secret_basic', dpop_bound_access_tokens: true },
);
const DPOP_NONCE_CLIENTS = new Set(['dpop-nonce-client']);
if (process.env.IDP_CLIENT_JWKS) {
  clients.push({
    client_id: 'jwt-client',
    token_endpoint_auth_method: 'private_key_jwt',
    jwks: JSON.parse(process.env.IDP_CLIENT_JWKS),
  });
}

// Mount points (see below): "|" and "^" go over the wire literally, "%7e" stays escaped.
const MOUNTS = ['/a|b', '/%7euser', '/x^y'];

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;

  const provider = new Provider(issuer, {
    clients: clients.map((c) => ({ ...c, grant_types: ['client_credentials'], response_types: [], redirect_uris: [] })),
    jwks: { keys: generations.flatMap((g) => [g.rsa, g.ec]) },
    cookies: { keys: ['interop-test-only'] }, // unused (no browser flows); set to silence a warning
    // Every algorithm m2m_client's DPoPKey can sign with (the default is ES256 and EdDSA only).
    enabledJWA: { dPoPSigningAlgValues: ['ES256', 'ES384', 'ES512', 'PS256', 'RS256', 'EdDSA'] },
    features: {
      devInteractions: { enabled: false }, // no login UI: this server only speaks client_credentials
      clientCredentials: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: randomBytes(32),
        requireNonce: (ctx) => DPOP_NONCE_CLIENTS.has(ctx.oidc?.client?.clientId),
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => DEFAULT_RESOURCE,
        getResourceServerInfo(ctx, resourceIndicator) {
          const alg = RESOURCES[resourceIndicator];
          if (!alg) throw new errors.InvalidTarget(); // RFC 8707 §2: unknown resource -> invalid_target
          const key = alg === 'ES256' ? generations[live].ec : generations[live].rsa;
          return {
            audience: resourceIndicator,
            scope: RESOURCE_SCOPES,
            accessTokenTTL: 300,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg, kid: key.kid } },
          };
        },
      },
    },
  });

  provider.use(async (ctx, next) => {
    if (ctx.path === '/__test__/rotate') {
      const admin = process.env.IDP_ADMIN_TOKEN;
      if (ctx.method !== 'POST' || (admin && ctx.get('authorization') !== `Bearer ${admin}`)) {
        ctx.status = 403;
        return;
      }
      if (live === ROTATIONS) {
        ctx.status = 409;
        ctx.body = { error: `only ${ROTATIONS} rotations are prepared` };
        return;
      }
      live += 1;
      ctx.body = { kids: [generations[live].rsa.kid, generations[live].ec.kid] };
      return;
    }
    await next();
    if (ctx.path === '/jwks' && ctx.status === 200) {
      const kids = publishedKids();
      // Never mutate ctx.body: it is the provider's own cached JWKS response object.
      ctx.body = {
        keys: ctx.body.keys
          .filter((k) => kids.has(k.kid))
          .sort((a, b) => Number(b.kid.split('-')[1]) - Number(a.kid.split('-')[1])),
      };
      ctx.set('cache-control', 'no-store'); // a rotation is visible at the next fetch
    }
  });

  // The provider is also mounted under these prefixes, whose characters a client's DPoP htu
  // must keep exactly as sent: oidc-provider compares htu with the URI of the route as
  // received (here <issuer><prefix>/token), after WHATWG URL parsing of both.
  const callback = provider.callback();
  server.on('request', (req, res) => {
    const mount = MOUNTS.find((prefix) => req.url.startsWith(`${prefix}/`));
    if (mount) {
      req.originalUrl = req.url; // oidc-provider's urlFor() reads the mount path from it
      req.url = req.url.slice(mount.length);
    }
    callback(req, res);
  });
  process.stdout.write(`LISTENING ${issuer}\n`);
});

// Exit cleanly (status 0) when the test fixture terminates us; drop idle keep-alive connections
// so close() does not wait for them.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
