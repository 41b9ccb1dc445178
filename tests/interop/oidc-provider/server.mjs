// A real, OpenID Certified authorization server (panva/oidc-provider, pinned by
// package-lock.json) and a DPoP-checking protected resource, for tests/interop.rs.
//
// Environment: PORT (loopback only), RS256_KEY and ES256_KEY (PEM private keys of the
// private_key_jwt clients; only their public halves are registered), ACCESS_TTL (seconds),
// AS_NONCE and RS_NONCE ("1": the token endpoint / the resource demand DPoP nonces).
//
//   /token, /jwks, ...          the provider
//   /api/...                    the resource: a token the provider issued; a DPoP-bound one
//                               only with `Authorization: DPoP` and a valid proof by the
//                               bound key (htm, htu, iat, jti once, ath, cnf.jkt), and the
//                               resource's nonce when RS_NONCE is set
//   POST /test/refresh-token    mint a refresh token for ?client_id= (a finished login)
//   GET  /test/stats            grants, errors and rotations the provider recorded

import { createServer } from 'node:http';
import { createHash, createPrivateKey, createPublicKey, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';
import { calculateJwkThumbprint, EmbeddedJWK, exportJWK, jwtVerify } from 'jose';

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;
const accessTtl = Number(process.env.ACCESS_TTL || 3600);

const publicJwk = async (file) => {
  const jwk = await exportJWK(createPublicKey(createPrivateKey(readFileSync(file))));
  // Registered as a JWKS would publish it: `kid` = the RFC 7638 thumbprint, which is also
  // the `kid` token-proxy sends when signing_key_id is not set.
  return { ...jwk, kid: await calculateJwkThumbprint(jwk) };
};
const rsa = await publicJwk(process.env.RS256_KEY);
const ec = await publicJwk(process.env.ES256_KEY);

const client = (id, alg, jwk, extra = {}) => ({
  client_id: id,
  token_endpoint_auth_method: 'private_key_jwt',
  token_endpoint_auth_signing_alg: alg,
  jwks: { keys: [jwk] },
  grant_types: ['client_credentials', 'refresh_token', 'authorization_code'],
  redirect_uris: ['https://client.example/cb'],
  response_types: ['code'],
  scope: 'openid offline_access api',
  ...extra,
});

const provider = new Provider(issuer, {
  clients: [
    client('rs256-client', 'RS256', rsa),
    client('es256-client', 'ES256', ec),
    // Tokens for this client must be DPoP-bound (RFC 9449 §5.2).
    client('es256-dpop-client', 'ES256', ec, { dpop_bound_access_tokens: true }),
  ],
  scopes: ['openid', 'offline_access', 'api'],
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    dPoP: {
      enabled: true,
      nonceSecret: randomBytes(32),
      requireNonce: () => process.env.AS_NONCE === '1',
    },
  },
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    RefreshToken: 3600,
    Grant: 3600,
  },
  rotateRefreshToken: true,
  findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
});

const stats = { grants: {}, errors: [], rotations: 0, reuse: 0 };
provider.on('grant.success', (ctx) => {
  const gt = ctx.oidc.params.grant_type;
  stats.grants[gt] = (stats.grants[gt] || 0) + 1;
});
provider.on('grant.error', (ctx, err) => {
  stats.errors.push(`${err.error}: ${err.error_description}`);
  if (/already used/.test(err.error_description || '')) stats.reuse += 1;
});
provider.on('refresh_token.consumed', () => { stats.rotations += 1; });

// The resource server's own DPoP nonce (RFC 9449 §9) and the proof ids it has seen.
let rsNonce = randomBytes(16).toString('base64url');
const seenJti = new Set();

const json = (res, status, body, headers = {}) => {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
};

async function resource(req, res, url) {
  const refuse = (scheme, error, extra = {}) => json(res, 401, { error }, {
    'www-authenticate': `${scheme} error="${error}"`, ...extra,
  });
  const [scheme, token] = (req.headers.authorization || '').split(' ');
  const at = token
    ? (await provider.AccessToken.find(token)) || (await provider.ClientCredentials.find(token))
    : undefined;
  if (!at || at.isExpired) return refuse(scheme === 'DPoP' ? 'DPoP' : 'Bearer', 'invalid_token');
  if (!at.jkt) {
    if (scheme !== 'Bearer') return refuse('Bearer', 'invalid_token');
  } else {
    if (scheme !== 'DPoP') return refuse('DPoP', 'invalid_token');
    let proof;
    try {
      proof = await jwtVerify(req.headers.dpop || '', EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256'] });
    } catch (e) {
      return refuse('DPoP', 'invalid_dpop_proof');
    }
    const { payload, protectedHeader } = proof;
    const htu = `${issuer}${url.pathname}`;
    const ath = createHash('sha256').update(token).digest('base64url');
    const problems = [];
    if (payload.htm !== req.method) problems.push('htm');
    if (payload.htu !== htu) problems.push(`htu ${payload.htu} != ${htu}`);
    if (payload.ath !== ath) problems.push('ath');
    if (Math.abs(Date.now() / 1000 - payload.iat) > 60) problems.push('iat');
    if (typeof payload.jti !== 'string' || seenJti.has(payload.jti)) problems.push('jti replayed');
    if (await calculateJwkThumbprint(protectedHeader.jwk) !== at.jkt) problems.push('cnf.jkt');
    if (problems.length) {
      stats.errors.push(`resource: ${problems.join(', ')}`);
      return refuse('DPoP', 'invalid_dpop_proof');
    }
    if (process.env.RS_NONCE === '1' && payload.nonce !== rsNonce) {
      stats.rsNonceChallenges = (stats.rsNonceChallenges || 0) + 1;
      return refuse('DPoP', 'use_dpop_nonce', { 'dpop-nonce': rsNonce });
    }
    seenJti.add(payload.jti);
  }
  stats.served = (stats.served || 0) + 1;
  return json(res, 200, {
    client_id: at.clientId, sub: at.accountId, bound: Boolean(at.jkt), jkt: at.jkt || null,
  });
}

async function mintRefreshToken(res, url) {
  const clientId = url.searchParams.get('client_id');
  const found = await provider.Client.find(clientId);
  const grant = new provider.Grant({ accountId: 'user-1', clientId });
  grant.addOIDCScope('openid offline_access');
  const grantId = await grant.save();
  const rt = new provider.RefreshToken({
    accountId: 'user-1', client: found, grantId, scope: 'openid offline_access', gty: 'authorization_code',
  });
  json(res, 200, { refresh_token: await rt.save() });
}

const callback = provider.callback();
createServer(async (req, res) => {
  const url = new URL(req.url, issuer);
  try {
    if (url.pathname.startsWith('/api/')) return await resource(req, res, url);
    if (url.pathname === '/test/refresh-token') return await mintRefreshToken(res, url);
    if (url.pathname === '/test/stats') return json(res, 200, stats);
    if (url.pathname === '/test/rotate-rs-nonce') {
      rsNonce = randomBytes(16).toString('base64url');
      return json(res, 200, {});
    }
    return callback(req, res);
  } catch (e) {
    return json(res, 500, { error: String(e) });
  }
}).listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
