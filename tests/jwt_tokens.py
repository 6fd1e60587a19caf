#!/usr/bin/env python3
"""The JWTs of tests/authz.rs: keys made here, a JWKS to serve, tokens good and bad.

    jwt_tokens.py DIR keys                  RSA key rsa-1, EC P-256 key ec-1 (both published in
                                            DIR/jwks.json) and RSA key stranger (not published)
    jwt_tokens.py DIR add-key KID           a new RSA key KID, published
    jwt_tokens.py DIR remove-key KID        KID no longer published (its private key stays)
    jwt_tokens.py DIR token JSON            a token; JSON says how (see `token` below)

Keys are private PEMs in DIR/<kid>.pem; jwks.json is replaced atomically (a server reading it
never sees half a file). Tokens are printed on stdout without a newline. PyJWT (`import jwt`,
with `cryptography`) signs the honest tokens; the dishonest ones (`alg: none`, HS256 keyed with
the RSA public key's PEM) are assembled by hand, as PyJWT refuses to make them.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def new_key(directory: str, kid: str, kind: str) -> None:
    if kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with open(os.path.join(directory, kid + ".pem"), "wb") as f:
        f.write(pem)


def private_key(directory: str, kid: str):
    with open(os.path.join(directory, kid + ".pem"), "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def jwk(directory: str, kid: str) -> dict:
    key = private_key(directory, kid)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        out = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        out["alg"] = "ES256"
    else:
        out = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        out["alg"] = "RS256"
    out["kid"] = kid
    out["use"] = "sig"
    return out


def publish(directory: str, kids: list) -> None:
    write_atomically(os.path.join(directory, "published"), json.dumps(kids))
    jwks = {"keys": [jwk(directory, kid) for kid in kids]}
    write_atomically(os.path.join(directory, "jwks.json"), json.dumps(jwks))


def published(directory: str) -> list:
    with open(os.path.join(directory, "published")) as f:
        return json.load(f)


def token(directory: str, spec: dict) -> str:
    """spec: key (kid of the signing key, default rsa-1), kid (the header's kid, default the
    key's), iss, sub, aud (omitted when null), exp / nbf / iat (seconds from now; exp default
    3600), claims (more claims), forge: "none" (alg none, no signature) or "hs256-pubkey" (HS256
    with the RSA public key's PEM as the HMAC secret)."""
    now = int(time.time())
    key_id = spec.get("key", "rsa-1")
    payload = {
        "iss": spec.get("iss", "https://idp.weft.test"),
        "sub": spec.get("sub", "alice"),
        "iat": now + spec.get("iat", 0),
        "exp": now + spec.get("exp", 3600),
    }
    aud = spec.get("aud", "weft-tests")
    if aud is not None:
        payload["aud"] = aud
    if "nbf" in spec:
        payload["nbf"] = now + spec["nbf"]
    payload.update(spec.get("claims", {}))
    kid = spec.get("kid", key_id)
    forge = spec.get("forge")
    if forge == "none":
        header = {"alg": "none", "typ": "JWT", "kid": kid}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
        return signing_input + "."
    if forge == "hs256-pubkey":
        public_pem = private_key(directory, key_id).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
        mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + b64url(mac)
    key = private_key(directory, key_id)
    alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


def main() -> None:
    directory, command = sys.argv[1], sys.argv[2]
    if command == "keys":
        new_key(directory, "rsa-1", "rsa")
        new_key(directory, "ec-1", "ec")
        new_key(directory, "stranger", "rsa")
        publish(directory, ["rsa-1", "ec-1"])
    elif command == "add-key":
        new_key(directory, sys.argv[3], "rsa")
        publish(directory, published(directory) + [sys.argv[3]])
    elif command == "remove-key":
        publish(directory, [k for k in published(directory) if k != sys.argv[3]])
    elif command == "token":
        sys.stdout.write(token(directory, json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))
    else:
        sys.exit("unknown command " + command)


if __name__ == "__main__":
    main()
