//! Table tests of the JWT decisions: rules from the proto, extraction, every refusal, stripping,
//! output headers, several issuers, and arbitrary bytes.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use weft_core::proto::weft::waypoint::v1 as wp;

use super::*;

pub(crate) const NOW: u64 = 1_700_000_000;
pub(crate) const ISS_A: &str = "https://a.example";
pub(crate) const ISS_B: &str = "https://b.example";

pub(crate) const RSA1_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDRXmPkbP/kvhRl
hYC1pfauurj6846Q3qcBfq9EG0IbU62HPFLlSqWAp6NgdEtb6dAXQLaZI9fNaTvW
hU4SG5HQzYhf+6SD/g15Gbr+MMmlGHNYjeV2bdnDaLibFmHHHWq0ASHvm7Tf6vIB
pccpQFHo6vu+7b3dOqjq0hbARIxvKfCI8qlWn4ig73dS3Djjz+LxsmCyf64Fu9im
t+lhgrhyNvYZZ5wELkF+GmNwU6EjWO2wGWlkC3iOD7g6h+Ea+Fyu2yG2sA0vwbJC
YYgKFbH1UPYOh+9ZTQ5QG2Ttyq7bSzmPhnAOx7Ug9j6lwXmrQnPd0GpsaHz1uvRU
hELZLiWbAgMBAAECggEAH0BTRshiVeFtfU3fzWgNbz1d2STmYIdrhD9FqAktj+io
m+lhh5Th1AIHJ/bpPLn6HqPBMxCfk1X5jDwaUCefV1HRNl/YdFSaluXupyc0d26J
NmxPwPgFVjQDwi/QE9Q3QNEedfvW6XQnVXRKSxpXtPLw9X8vz52EPdtyxpY0zsQT
DHS0Ouzf7i0c2ZR9HkVOFGwO7si9cm2Yh3agbg1TvtzdeLXnglRPe9YDTWclPlSW
mJmVQbkkWEIhbDiormNPsl9ORA63htCn/Sl2Kmwc+ZdjRXhlfUDSqz1kvEjJKMSE
lZMdsVjq65F5RqNMM63US6TPvtK/LSphyb/6LyzaYQKBgQDrfeofN9bY0l+ihfAo
7GMEOoM/DgzEqR7tJTJekG1CIiLdtd/jLhhuIBsooFOHriToNPKn08aBoT0LlxRh
xt3/Q7AHbk5kCreKMECNTAi4mVoWKEZ+Oc3NQKRhBEC+RMC8KU7Hxu0pIhV1mhmO
bssO6LhZtNeGCka0UnM2pGjjcQKBgQDjmhU/rWfYcDFrVhF5srXQIPeC/SD8YffI
MV5lMXbV/iJXGjFq5aJ+BjGRWDXVvprM2FY0lGuAfQOM1UsexSWxs6q5VQxMLR8N
wfWgEVLoBnVtAESpbE40oNFulozOjZT7vmq5iCLxRtxDFsoH5H30c1Ve3EK54ISd
sR8RTiL7ywKBgQDdXeHFMtJtw2RO/KUDcyKpCO/zSBvMikYeGoc8yXtLXZd03tD1
V5FzhA7Do+KhepwLBCrOhI7nsFAYIw7v0udAW7qPYaui80gRSMaFjGHuVYmPppCN
e3zwYsGiyUKrGSosNpBtz5uEvRt7Dz7S22daPn19JjgrMmHAhHj1dpt6oQKBgEoj
kvBfKAiU40Q3kRG3aQoW8wk0M16C+xe3HSyRZEhos/7zhU1w5/FtSxAxT7gEkqBP
iCUwg6QjFNj3UbUAOzsbb21Xit31hLwShlRR0FPMZsvO3o7hvMff6ti/KbbO38zx
RgqRkfBOSMmBzuWrRGwwdYqk7QdnX0uOurQEY9jpAoGBAM3EzTH7J8Eg2ML9VI2C
o26N1e8a9FNqjyvZCJhkV+cxDRolkdF+r9Atk04eRZvn8XiVgJtUe7+88i7GLEZv
tmiAU6/1UKp0xcmU0biUxNpU4d5El30t+Lw7NmiL0k72c4CT6iLXcvudUWo1oT6e
YtFNQqMylhELDv/5p5RhDt7M
-----END PRIVATE KEY-----
";
pub(crate) const RSA1_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA0V5j5Gz/5L4UZYWAtaX2
rrq4+vOOkN6nAX6vRBtCG1OthzxS5UqlgKejYHRLW+nQF0C2mSPXzWk71oVOEhuR
0M2IX/ukg/4NeRm6/jDJpRhzWI3ldm3Zw2i4mxZhxx1qtAEh75u03+ryAaXHKUBR
6Or7vu293Tqo6tIWwESMbynwiPKpVp+IoO93Utw448/i8bJgsn+uBbvYprfpYYK4
cjb2GWecBC5BfhpjcFOhI1jtsBlpZAt4jg+4OofhGvhcrtshtrANL8GyQmGIChWx
9VD2DofvWU0OUBtk7cqu20s5j4ZwDse1IPY+pcF5q0Jz3dBqbGh89br0VIRC2S4l
mwIDAQAB
-----END PUBLIC KEY-----
";
pub(crate) const RSA1_JWK: &str = r#"{"kty":"RSA","key_ops":["verify"],"n":"0V5j5Gz_5L4UZYWAtaX2rrq4-vOOkN6nAX6vRBtCG1OthzxS5UqlgKejYHRLW-nQF0C2mSPXzWk71oVOEhuR0M2IX_ukg_4NeRm6_jDJpRhzWI3ldm3Zw2i4mxZhxx1qtAEh75u03-ryAaXHKUBR6Or7vu293Tqo6tIWwESMbynwiPKpVp-IoO93Utw448_i8bJgsn-uBbvYprfpYYK4cjb2GWecBC5BfhpjcFOhI1jtsBlpZAt4jg-4OofhGvhcrtshtrANL8GyQmGIChWx9VD2DofvWU0OUBtk7cqu20s5j4ZwDse1IPY-pcF5q0Jz3dBqbGh89br0VIRC2S4lmw","e":"AQAB"}"#;
pub(crate) const RSA2_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC51HDeByweTVAR
ir7pr/Romurv6k3SluPB7KdaX2iUGcozPOUuYILjpfbwjg3QEp6DeFVxWS4opanP
XZIWikp9tDU6zjeMEW9s9/MtLNAcH0xpwHCbIhtWUyP7/e7aUCT4/JHluBqfYYaV
7NkRitsT3VGGZ4DR/xglBvsWpgRSTQN5pr+JrZVbZuWRpQHy8tAeZljdOFE/Lmfu
OIMuYJ9PGrGMkTDJjNbRqtttzX+jY4nlQwvfNs4dbH7+S92lWI7qReRG4L2I1KhY
Xf1SD/G0EU2zgoTrnkvJj1uaGYrsasUZNtaMPI6OQco9CBKwWpdTfuDvPyoROdTk
OkZvcelLAgMBAAECggEAE6WMZJ+hKvelOk2PH07NNM1YKb2oX6uN8Iqa1kOrCf7A
sXJuj9zVSciErJcgNQ+a4a8fEsjzx96ymYFnjhQt3voRUffLyKEZROM2uwp3WtnL
mYymex2mgpXErVeCDA5tckOQZeyf0ppG1o1VanTh8kjeXdWN5DsnltaU76aQDhFM
jisL2HJ2hkF8xl+3SmRSKbGZ05KOvrXCkBYzPv+60rKuj9RgziCLI9DFNuXl92D6
YIMglk185+gIyOXFvMqApycGV5oRkeXJfm+Cqmxg7nC0/6LYH1Lv14Qf13XYB4db
2ElgKQZqyeP73/XCEeVHGmeHjgjUqPc8EOjQjYpDEQKBgQDg0H/wrIW0R4pRYIPW
HSSiTD6tYRdfShTBcoOlqXs5f9Y/r0TkGg36Ba3Bi76sOppgtrejKaTXN3PnTauK
kfZqfSCpkF6y/xtTxux/cV8BHe9QGJZKPlzFFQLRud9HMzF/0IQ/9ftGjPN94IKZ
t+TaGCG9b4HX2ojI+0ow59IUMQKBgQDTm4n8W7gF5kl5GKvEELzsNWQjnjROVWoy
eA64d1fz1KSaKsc60LXcUly+XXgfsEfIAuwYhkAjMhJnwoM/k+BZbvlRZl+DklaA
P/NFSiFZtSBRZpZAANWMZyu3yR9nh6nSe+3KrHN/y813ZpDpp0Sq2aPegQ/BUipl
4HgTRnTiOwKBgBA0d0Rt6yVXkszS3C3u49kfDdWJjhm8SUq4amzijpNSd6sXgyu+
BQvkpOWyoQfhIYefJBWKxusMgDpICvluFAkRA+21Dl5wrROY3ytAjMyTz9BCNXMc
k6tRHGbpswJ62jKQYTgLDxXCyzpjmIZkDwb5flUdWIqqofl6w5pK24XBAoGAcmgw
xXEtYHsulDtjesD189u2BY/ehc+meBzzEIbt1ZXNXNDuIH2BJdqd7AqLDM75MEls
LqI/AQhsbQ78eR5ReOkIARuRXoh7HiH1PCwlNeQ40eneKEKLMrsBJv+lbAssJPH+
EcsFMz4UG48noDxgYuMCtyUeSI5NAAHJydoZDcsCgYEApz1soU2P6gXTIVXS76JG
D8e4FiN55nHvrvGU6sit/fmnaiHj2vbaWVqpM8SXR0/RxbDVeOzsaBiIe5btlAx4
7UaIDidbsIHIdF29ZrRcee2OCNbldUCEUEu2Px/BIpkerk8/hHFWlO05uuYD8Skp
PrD22CF+PK8Rb8ObcFaYjAI=
-----END PRIVATE KEY-----
";
pub(crate) const RSA2_JWK: &str = r#"{"kty":"RSA","key_ops":["verify"],"n":"udRw3gcsHk1QEYq-6a_0aJrq7-pN0pbjweynWl9olBnKMzzlLmCC46X28I4N0BKeg3hVcVkuKKWpz12SFopKfbQ1Os43jBFvbPfzLSzQHB9MacBwmyIbVlMj-_3u2lAk-PyR5bgan2GGlezZEYrbE91RhmeA0f8YJQb7FqYEUk0Deaa_ia2VW2blkaUB8vLQHmZY3ThRPy5n7jiDLmCfTxqxjJEwyYzW0arbbc1_o2OJ5UML3zbOHWx-_kvdpViO6kXkRuC9iNSoWF39Ug_xtBFNs4KE655LyY9bmhmK7GrFGTbWjDyOjkHKPQgSsFqXU37g7z8qETnU5DpGb3HpSw","e":"AQAB"}"#;
pub(crate) const EC256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQObK5YLtDWAeaMTH
wJnOr/fXuI756MYfRqRDvLlTZ7qhRANCAASzTm9iyaTlRUanSGAlkCKYlQg/hh2X
Ilixd/aI5gfanMOdj1cQwIm9EUsU4UNWetddp/6kxMEvi1ib5nAqUEjl
-----END PRIVATE KEY-----
";
pub(crate) const EC256_JWK: &str = r#"{"kty":"EC","crv":"P-256","x":"s05vYsmk5UVGp0hgJZAimJUIP4YdlyJYsXf2iOYH2pw","y":"w52PVxDAib0RSxThQ1Z6112n_qTEwS-LWJvmcCpQSOU"}"#;
pub(crate) const EC384_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDCg36VS85zKfzhNtBse
0u2biH+htY4tw+x2gZaQjkyZqkfwuxxAMqxx46MXuBzNVfuhZANiAAR91/YDaaZu
sR7pjNQCitngUw/+as5QDvGVKEDDx70nwP3Nv2+KRzH+ZK76RSqEgYytaE9qUOnX
L5+vfkPgYKaCzSJ3vyRzgriOtb7uytWd/J00PcCCKT50dULM51FPWDE=
-----END PRIVATE KEY-----
";
pub(crate) const EC384_JWK: &str = r#"{"kty":"EC","crv":"P-384","x":"fdf2A2mmbrEe6YzUAorZ4FMP_mrOUA7xlShAw8e9J8D9zb9vikcx_mSu-kUqhIGM","y":"rWhPalDp1y-fr35D4GCmgs0id78kc4K4jrW-7srVnfydND3Agik-dHVCzOdRT1gx"}"#;
pub(crate) const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIMgn4D5RBVgy53xY6aCdum6hT7/wQ4Q5TvzE59j+WOOd
-----END PRIVATE KEY-----
";
pub(crate) const ED_JWK: &str =
    r#"{"x":"lo9jG3uh-eIz8yUUQQWss6u5ltEdT9V3yJYjQ6xeoGc","kty":"OKP","crv":"Ed25519"}"#;

/// A JWK with `kid` and, when given, `alg` added.
pub(crate) fn jwk(base: &str, kid: &str, alg: Option<&str>) -> Value {
    let mut v: Value = serde_json::from_str(base).expect("test JWK");
    v["kid"] = json!(kid);
    if let Some(alg) = alg {
        v["alg"] = json!(alg);
    }
    v
}

pub(crate) fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

pub(crate) fn sign(alg: Algorithm, private: &str, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(private.as_bytes()),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(private.as_bytes()),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Ok(EncodingKey::from_secret(private.as_bytes()))
        }
        _ => EncodingKey::from_rsa_pem(private.as_bytes()),
    }
    .expect("test key");
    let header = Header { alg, kid: kid.map(str::to_string), ..Header::default() };
    jsonwebtoken::encode(&header, claims, &key).expect("signing")
}

pub(crate) fn claims(iss: &str) -> Value {
    json!({ "iss": iss, "sub": "alice", "aud": "svc-a", "exp": NOW + 3600, "iat": NOW })
}

pub(crate) fn proto_rule(issuer: &str) -> wp::JwtRule {
    wp::JwtRule { issuer: issuer.into(), ..Default::default() }
}

fn rule_a() -> JwtRule {
    let mut r = proto_rule(ISS_A);
    r.audiences = vec!["svc-a".into(), "svc-x".into()];
    r.jwks = jwks(&[
        jwk(RSA1_JWK, "r1", None),
        jwk(EC256_JWK, "e1", Some("ES256")),
        jwk(EC384_JWK, "e2", None),
        jwk(ED_JWK, "d1", Some("EdDSA")),
    ]);
    JwtRule::try_from(&r).expect("rule a")
}

fn rule_b() -> JwtRule {
    let mut r = proto_rule(ISS_B);
    r.jwks = jwks(&[jwk(RSA2_JWK, "r2", Some("RS256"))]);
    JwtRule::try_from(&r).expect("rule b")
}

pub(crate) fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn run(rules: &[&JwtRule], mut parts: Parts) -> (Result<Option<Authenticated>, Refusal>, Parts) {
    let lookup = |_: &str| None;
    let out = match check(rules, &parts, NOW, &lookup, &[]) {
        Check::Pass(v) => {
            apply(rules, &mut parts, &v);
            Ok(v.first())
        }
        Check::Refuse(r) => Err(r),
        Check::Fetch { uri, .. } => panic!("inline rules fetched {uri}"),
    };
    (out, parts)
}

fn bearer(token: &str) -> Parts {
    request("/", &[("authorization", &format!("Bearer {token}"))])
}

fn b64(v: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

#[test]
fn tokens_decided() {
    let (a, b) = (rule_a(), rule_b());
    let rules = [&a, &b];
    let c = claims(ISS_A);
    let rs = |c: &Value| sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), c);
    let good = rs(&c);
    let cases: Vec<(&str, String, Option<Status>)> = vec![
        ("RS256", good.clone(), None),
        ("RS384", sign(Algorithm::RS384, RSA1_PRIVATE, Some("r1"), &c), None),
        ("RS512", sign(Algorithm::RS512, RSA1_PRIVATE, Some("r1"), &c), None),
        ("PS256", sign(Algorithm::PS256, RSA1_PRIVATE, Some("r1"), &c), None),
        ("PS384", sign(Algorithm::PS384, RSA1_PRIVATE, Some("r1"), &c), None),
        ("PS512", sign(Algorithm::PS512, RSA1_PRIVATE, Some("r1"), &c), None),
        ("ES256", sign(Algorithm::ES256, EC256_PRIVATE, Some("e1"), &c), None),
        ("ES384", sign(Algorithm::ES384, EC384_PRIVATE, Some("e2"), &c), None),
        ("EdDSA", sign(Algorithm::EdDSA, ED_PRIVATE, Some("d1"), &c), None),
        ("no kid: every fitting key tried", sign(Algorithm::ES256, EC256_PRIVATE, None, &c), None),
        (
            "issuer B, no audiences required",
            sign(Algorithm::RS256, RSA2_PRIVATE, Some("r2"), &json!({"iss": ISS_B, "sub": "bob"})),
            None,
        ),
        ("aud list intersecting", rs(&with(c.clone(), "aud", json!(["other", "svc-x"]))), None),
        ("expired within skew", rs(&with(c.clone(), "exp", json!(NOW - 59))), None),
        ("nbf within skew", rs(&with(c.clone(), "nbf", json!(NOW + 59))), None),
        ("expired beyond skew", rs(&with(c.clone(), "exp", json!(NOW - 61))), Some(Status::JwtExpired)),
        ("nbf in the future", rs(&with(c.clone(), "nbf", json!(NOW + 61))), Some(Status::JwtNotYetValid)),
        (
            "unknown issuer",
            rs(&with(c.clone(), "iss", json!("https://evil.example"))),
            Some(Status::JwtUnknownIssuer),
        ),
        ("no issuer", rs(&json!({"sub": "x", "aud": "svc-a"})), Some(Status::JwtUnknownIssuer)),
        ("wrong audience", rs(&with(c.clone(), "aud", json!("svc-b"))), Some(Status::JwtAudienceNotAllowed)),
        ("no audience", rs(&json!({"iss": ISS_A, "sub": "x"})), Some(Status::JwtAudienceNotAllowed)),
        (
            "other key's signature",
            sign(Algorithm::RS256, RSA2_PRIVATE, Some("r1"), &c),
            Some(Status::JwtVerificationFail),
        ),
        (
            "other key, no kid",
            sign(Algorithm::RS256, RSA2_PRIVATE, None, &c),
            Some(Status::JwtVerificationFail),
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, RSA1_PRIVATE, Some("nope"), &c),
            Some(Status::JwksKidAlgMismatch),
        ),
        (
            "key alg RS256, token PS256",
            sign(Algorithm::PS256, RSA2_PRIVATE, Some("r2"), &json!({"iss": ISS_B})),
            Some(Status::JwksKidAlgMismatch),
        ),
        (
            "EC key for an RSA alg",
            sign(Algorithm::RS256, RSA1_PRIVATE, Some("e1"), &c),
            Some(Status::JwksKidAlgMismatch),
        ),
        (
            "P-384 key for ES256",
            sign(Algorithm::ES256, EC256_PRIVATE, Some("e2"), &c),
            Some(Status::JwksKidAlgMismatch),
        ),
        (
            "HS256 keyed with the RSA public key",
            sign(Algorithm::HS256, RSA1_PUBLIC_PEM, Some("r1"), &c),
            Some(Status::JwksKidAlgMismatch),
        ),
        ("HS256 no kid", sign(Algorithm::HS256, RSA1_PUBLIC_PEM, None, &c), Some(Status::JwksKidAlgMismatch)),
        (
            "alg none",
            format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&c.to_string())),
            Some(Status::JwtHeaderNotImplementedAlg),
        ),
        (
            "alg none with a signature",
            format!("{}.{}.c2ln", b64(r#"{"alg":"none","kid":"r1"}"#), b64(&c.to_string())),
            Some(Status::JwtHeaderNotImplementedAlg),
        ),
        (
            "no alg",
            format!("{}.{}.c2ln", b64(r#"{"kid":"r1"}"#), b64(&c.to_string())),
            Some(Status::JwtHeaderBadAlg),
        ),
        (
            "kid not a string",
            format!("{}.{}.c2ln", b64(r#"{"alg":"RS256","kid":7}"#), b64(&c.to_string())),
            Some(Status::JwtHeaderBadKid),
        ),
        ("garbage", "garbage".into(), Some(Status::JwtBadFormat)),
        ("two segments", "abc.def".into(), Some(Status::JwtBadFormat)),
        ("four segments", format!("{good}.x"), Some(Status::JwtBadFormat)),
        (
            "truncated mid-token",
            good[..good.len() / 2].split('.').take(2).collect::<Vec<_>>().join("."),
            Some(Status::JwtBadFormat),
        ),
        (
            "truncated signature",
            {
                let (signed, sig) = good.rsplit_once('.').expect("three parts");
                format!("{signed}.{}", &sig[..sig.len() / 4 * 4 - 4])
            },
            Some(Status::JwtVerificationFail),
        ),
        ("header not base64", "a-b_c*.e30.c2ln".into(), Some(Status::JwtBadFormat)),
        ("header not JSON", format!("{}.e30.c2ln", b64("{nope")), Some(Status::JwtHeaderBadJson)),
        ("header a JSON string", format!("{}.e30.c2ln", b64("\"x\"")), Some(Status::JwtHeaderBadJson)),
        (
            "payload not JSON",
            format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64("[1,")),
            Some(Status::JwtPayloadBadJson),
        ),
        ("iss a number", rs(&with(c.clone(), "iss", json!(5))), Some(Status::JwtIssNotString)),
        ("exp a string", rs(&with(c.clone(), "exp", json!("soon"))), Some(Status::JwtExpNotInteger)),
        ("exp negative", rs(&with(c.clone(), "exp", json!(-5))), Some(Status::JwtExpOutOfRange)),
        ("aud a number", rs(&with(c.clone(), "aud", json!(5))), Some(Status::JwtAudNotString)),
        (
            "payload tampered",
            {
                let mut p: Vec<&str> = good.split('.').collect();
                let forged = b64(&with(c.clone(), "sub", json!("admin")).to_string());
                p[1] = &forged;
                p.join(".")
            },
            Some(Status::JwtVerificationFail),
        ),
    ];
    for (name, token, want) in cases {
        let (got, _) = run(&rules, bearer(&token));
        match (want, got) {
            (None, Ok(Some(_))) => {}
            (Some(s), Err(r)) => {
                assert_eq!(r.code, s, "{name}: {r:?}");
                assert_eq!(r.body, s.text(), "{name}");
                assert_eq!(r.status, s.http_status(), "{name}");
                assert!(!r.reason.contains(&token) || token.len() < 8, "{name}: reason holds the token");
            }
            (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn envoy_texts_and_statuses() {
    let cases = [
        (Status::JwtExpired, 401, "Jwt is expired"),
        (Status::JwtNotYetValid, 401, "Jwt not yet valid"),
        (Status::JwtUnknownIssuer, 401, "Jwt issuer is not configured"),
        (Status::JwtAudienceNotAllowed, 401, "Audiences in Jwt are not allowed"),
        (Status::JwksKidAlgMismatch, 401, "Jwks doesn't have key to match kid or alg from Jwt"),
        (Status::JwtVerificationFail, 401, "Jwt verification fails"),
        (Status::JwtHeaderBadJson, 401, "Jwt header is an invalid JSON"),
        (Status::JwksFetchFail, 401, "Jwks remote fetch is failed"),
        (
            Status::JwtBadFormat,
            401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ];
    for (s, code, text) in cases {
        assert_eq!((s.http_status().as_u16(), s.text()), (code, text), "{s:?}");
    }
}

#[test]
fn oversized_token_refused_without_decoding() {
    let a = rule_a();
    let huge = format!("{}.{}.{}", "a".repeat(400_000), "b".repeat(400_000), "c".repeat(300_000));
    let start = std::time::Instant::now();
    let (got, _) = run(&[&a], bearer(&huge));
    let r = got.expect_err("refused");
    assert_eq!(r.code, Status::JwtTooLarge);
    assert_eq!((r.status.as_u16(), r.body), (401, "Jwt verification fails"));
    assert!(r.reason.len() < 200, "the reason does not carry the token");
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(parse(&huge).map(|_| ()), Err(Status::JwtTooLarge));
}

#[test]
fn no_token_passes_unauthenticated() {
    let a = rule_a();
    let cases = [
        ("no header", request("/", &[])),
        ("basic auth", request("/", &[("authorization", "Basic YWxhZGRpbjpvcGVu")])),
        ("bearer with nothing", request("/", &[("authorization", "Bearer   ")])),
        ("other param", request("/?token=x.y.z", &[])),
        ("custom header not a rule location", request("/", &[("x-jwt", "a.b.c")])),
    ];
    for (name, parts) in cases {
        let (got, _) = run(&[&a], parts);
        assert_eq!(got, Ok(None), "{name}");
    }
}

#[test]
fn extraction_locations() {
    let good = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &claims(ISS_A));
    let mut custom = proto_rule(ISS_A);
    custom.jwks = jwks(&[jwk(RSA1_JWK, "r1", None)]);
    custom.from_headers = vec![wp::jwt_rule::FromHeader { name: "x-jwt".into(), prefix: "Token ".into() }];
    custom.from_params = vec!["jwt".into()];
    custom.from_cookies = vec!["session".into()];
    let custom = JwtRule::try_from(&custom).expect("custom");
    let default = rule_a();
    let cases: Vec<(&str, &JwtRule, Parts, Option<Location>)> = vec![
        (
            "default: Authorization Bearer",
            &default,
            bearer(&good),
            Some(Location::Header { name: AUTHORIZATION, prefix: "Bearer ".into() }),
        ),
        (
            "default: prefix case-insensitive",
            &default,
            request("/", &[("authorization", &format!("bearer {good}"))]),
            Some(Location::Header { name: AUTHORIZATION, prefix: "Bearer ".into() }),
        ),
        (
            "default: access_token param",
            &default,
            request(&format!("/p?a=1&access_token={good}"), &[]),
            Some(Location::Param("access_token".into())),
        ),
        (
            "default: not a cookie",
            &default,
            request("/", &[("cookie", &format!("access_token={good}"))]),
            None,
        ),
        (
            "custom header and prefix",
            &custom,
            request("/", &[("x-jwt", &format!("Token {good}"))]),
            Some(Location::Header { name: HeaderName::from_static("x-jwt"), prefix: "Token ".into() }),
        ),
        ("custom header, wrong prefix", &custom, request("/", &[("x-jwt", &format!("Bearer {good}"))]), None),
        ("custom: Authorization no longer read", &custom, bearer(&good), None),
        (
            "custom param",
            &custom,
            request(&format!("/?jwt={good}"), &[]),
            Some(Location::Param("jwt".into())),
        ),
        (
            "custom cookie",
            &custom,
            request("/", &[("cookie", &format!("a=1; session={good}; b=2"))]),
            Some(Location::Cookie("session".into())),
        ),
        (
            "custom cookie, second header",
            &custom,
            request("/", &[("cookie", "a=1"), ("cookie", &format!("session=\"{good}\""))]),
            Some(Location::Cookie("session".into())),
        ),
    ];
    for (name, rule, parts, want) in cases {
        let found = extract(&[rule], &parts);
        assert_eq!(found.first().map(|f| f.location.clone()), want, "{name}");
        if let Some(f) = found.first() {
            assert_eq!(f.token, good, "{name}");
        }
        let (got, _) = run(&[rule], parts);
        assert_eq!(got.map(|a| a.is_some()), Ok(!found.is_empty()), "{name}");
    }
}

/// (name, rule, request, path and query after, `x-jwt` after, `cookie` after).
type StripCase<'a> = (&'a str, &'a JwtRule, Parts, &'a str, Option<&'a str>, Option<&'a str>);

#[test]
fn token_stripped_unless_forwarded() {
    let good = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &claims(ISS_A));
    let mut p = proto_rule(ISS_A);
    p.jwks = jwks(&[jwk(RSA1_JWK, "r1", None)]);
    p.from_headers = vec![wp::jwt_rule::FromHeader { name: "x-jwt".into(), prefix: String::new() }];
    p.from_params = vec!["jwt".into()];
    p.from_cookies = vec!["session".into()];
    let strip = JwtRule::try_from(&p).expect("rule");
    p.forward_original_token = true;
    let keep = JwtRule::try_from(&p).expect("rule");
    let cases: Vec<StripCase> = vec![
        ("header", &strip, request("/p", &[("x-jwt", &good)]), "/p", None, None),
        (
            "param among others",
            &strip,
            request(&format!("/p?a=1&jwt={good}&b=2"), &[]),
            "/p?a=1&b=2",
            None,
            None,
        ),
        ("param alone", &strip, request(&format!("/p?jwt={good}"), &[]), "/p", None, None),
        (
            "cookie among others",
            &strip,
            request("/p", &[("cookie", &format!("a=1; session={good}; b=2"))]),
            "/p",
            None,
            Some("a=1; b=2"),
        ),
        ("cookie alone", &strip, request("/p", &[("cookie", &format!("session={good}"))]), "/p", None, None),
        ("forwarded header", &keep, request("/p", &[("x-jwt", &good)]), "/p", Some(good.as_str()), None),
    ];
    let fwd_param = format!("/p?jwt={good}");
    for (name, rule, parts, path, x_jwt, cookie) in cases {
        let (got, parts) = run(&[rule], parts);
        assert!(matches!(got, Ok(Some(_))), "{name}: {got:?}");
        assert_eq!(parts.uri.path_and_query().map(|p| p.as_str()), Some(path), "{name}");
        assert_eq!(parts.headers.get("x-jwt").and_then(|v| v.to_str().ok()), x_jwt, "{name}");
        assert_eq!(parts.headers.get("cookie").and_then(|v| v.to_str().ok()), cookie, "{name}");
    }
    let (_, parts) = run(&[&keep], request(&fwd_param, &[]));
    assert_eq!(parts.uri.path_and_query().map(|p| p.as_str()), Some(fwd_param.as_str()));
}

#[test]
fn output_headers() {
    let c = json!({"iss": ISS_A, "sub": "alice", "aud": "svc-a", "exp": NOW + 60, "azp": "web",
        "email": "a@example.com", "admin": true, "level": 3, "groups": ["x"], "org": {"team": "core"},
        "bad": "line\nbreak"});
    let good = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &c);
    let mut p = proto_rule(ISS_A);
    p.jwks = jwks(&[jwk(RSA1_JWK, "r1", None)]);
    p.output_payload_to_header = "x-jwt-payload".into();
    p.output_claim_to_headers = ["email", "admin", "level", "groups", "org.team", "missing", "bad"]
        .iter()
        .map(|c| wp::jwt_rule::ClaimToHeader {
            header: format!("x-{}", c.replace('.', "-")),
            claim: c.to_string(),
        })
        .collect();
    let rule = JwtRule::try_from(&p).expect("rule");
    let (got, parts) = run(&[&rule], bearer(&good));
    let auth = got.expect("ok").expect("authenticated");
    assert_eq!(auth.principal, format!("{ISS_A}/alice"));
    assert_eq!((auth.issuer.as_str(), auth.subject.as_str()), (ISS_A, "alice"));
    assert_eq!(auth.audiences, vec!["svc-a".to_string()]);
    assert_eq!(auth.presenter.as_deref(), Some("web"));
    assert_eq!(auth.claims, c);
    let h = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(h("authorization"), None, "token stripped");
    let payload = h("x-jwt-payload").expect("payload header");
    assert_eq!(payload, good.split('.').nth(1).expect("payload").to_string());
    let decoded: Value = serde_json::from_slice(&b64url().decode(&payload).expect("b64")).expect("json");
    assert_eq!(decoded, c);
    assert_eq!(h("x-email").as_deref(), Some("a@example.com"));
    assert_eq!(h("x-admin").as_deref(), Some("true"));
    assert_eq!(h("x-level").as_deref(), Some("3"));
    assert_eq!(h("x-org-team").as_deref(), Some("core"));
    assert_eq!((h("x-groups"), h("x-missing"), h("x-bad")), (None, None, None));

    // A client's own payload or claim header never reaches the backend, with or without a token.
    let spoof = request("/", &[("x-jwt-payload", "forged"), ("x-email", "boss@example.com")]);
    let (got, parts) = run(&[&rule], spoof);
    assert_eq!(got, Ok(None));
    assert!(parts.headers.get("x-jwt-payload").is_none() && parts.headers.get("x-email").is_none());
}

#[test]
fn several_issuers_and_tokens() {
    let (a, b) = (rule_a(), rule_b());
    let ta = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &claims(ISS_A));
    let tb = sign(Algorithm::RS256, RSA2_PRIVATE, Some("r2"), &json!({"iss": ISS_B, "sub": "bob"}));
    for (name, rules) in [("a then b", vec![&a, &b]), ("b then a", vec![&b, &a])] {
        let (got, _) = run(&rules, bearer(&ta));
        assert_eq!(got.expect("a").map(|x| x.principal), Some(format!("{ISS_A}/alice")), "{name}");
        let (got, _) = run(&rules, bearer(&tb));
        assert_eq!(got.expect("b").map(|x| x.principal), Some(format!("{ISS_B}/bob")), "{name}");
    }
    // B's key does not verify for A's issuer.
    let forged = sign(Algorithm::RS256, RSA2_PRIVATE, Some("r2"), &claims(ISS_A));
    let (got, _) = run(&[&a, &b], bearer(&forged));
    assert_eq!(got.map(|_| ()).map_err(|r| r.code), Err(Status::JwksKidAlgMismatch));
    // Two tokens: both good passes; one bad refuses the request.
    let both = request(&format!("/?access_token={tb}"), &[("authorization", &format!("Bearer {ta}"))]);
    let (got, parts) = run(&[&a, &b], both);
    assert_eq!(got.expect("both").map(|x| x.issuer), Some(ISS_A.to_string()));
    assert_eq!(parts.uri.query(), None);
    let one_bad = request("/?access_token=bad.to.ken", &[("authorization", &format!("Bearer {ta}"))]);
    let (got, _) = run(&[&a, &b], one_bad);
    assert!(got.is_err());
    // A token in a location only rule A lists is not tried against B's issuer.
    let mut only_x = proto_rule(ISS_A);
    only_x.jwks = a_jwks();
    only_x.from_headers = vec![wp::jwt_rule::FromHeader { name: "x-a".into(), prefix: String::new() }];
    let only_x = JwtRule::try_from(&only_x).expect("rule");
    let (got, _) = run(&[&only_x, &b], request("/", &[("x-a", &tb)]));
    assert_eq!(got.map(|_| ()).map_err(|r| r.code), Err(Status::JwtUnknownIssuer));
}

fn a_jwks() -> String {
    jwks(&[jwk(RSA1_JWK, "r1", None)])
}

type Edit = Box<dyn Fn(&mut wp::JwtRule)>;

#[test]
fn rules_from_proto() {
    let ok = |f: &dyn Fn(&mut wp::JwtRule)| {
        let mut r = proto_rule(ISS_A);
        r.jwks_uri = "https://a.example/jwks".into();
        f(&mut r);
        JwtRule::try_from(&r)
    };
    let rule = ok(&|_| {}).expect("plain");
    assert!(matches!(&rule.keys, KeySource::Remote(u) if u == "https://a.example/jwks"));
    assert_eq!(rule.timeout, DEFAULT_JWKS_TIMEOUT);
    assert_eq!(
        rule.locations,
        vec![
            Location::Header { name: AUTHORIZATION, prefix: "Bearer ".into() },
            Location::Param("access_token".into()),
        ]
    );
    let inline = ok(&|r| r.jwks = a_jwks()).expect("inline");
    assert!(matches!(&inline.keys, KeySource::Inline(k) if k.kids() == vec![Some("r1")]));
    let timed = ok(&|r| r.timeout = Some(prost_types::Duration { seconds: 2, nanos: 0 })).expect("t");
    assert_eq!(timed.timeout, Duration::from_secs(2));
    let errors: Vec<(&str, Edit, &str)> = vec![
        ("no issuer", Box::new(|r| r.issuer.clear()), "jwtRules.issuer"),
        ("inline not JSON", Box::new(|r| r.jwks = "{".into()), "jwtRules.jwks"),
        ("inline no keys field", Box::new(|r| r.jwks = "{}".into()), "jwtRules.jwks"),
        (
            "inline only an HMAC key",
            Box::new(|r| r.jwks = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into()),
            "jwtRules.jwks",
        ),
        ("jwksUri ftp", Box::new(|r| r.jwks_uri = "ftp://a.example/jwks".into()), "jwtRules.jwksUri"),
        ("jwksUri relative", Box::new(|r| r.jwks_uri = "/jwks".into()), "jwtRules.jwksUri"),
        ("no keys at all", Box::new(|r| r.jwks_uri.clear()), "jwtRules.jwksUri"),
        (
            "bad header name",
            Box::new(|r| {
                r.from_headers = vec![wp::jwt_rule::FromHeader { name: "a b".into(), prefix: String::new() }]
            }),
            "jwtRules.fromHeaders.name",
        ),
        (
            "bad payload header",
            Box::new(|r| r.output_payload_to_header = "x y".into()),
            "jwtRules.outputPayloadToHeader",
        ),
        (
            "bad claim header",
            Box::new(|r| {
                r.output_claim_to_headers =
                    vec![wp::jwt_rule::ClaimToHeader { header: "\n".into(), claim: "sub".into() }]
            }),
            "jwtRules.outputClaimToHeaders.header",
        ),
        (
            "negative timeout",
            Box::new(|r| r.timeout = Some(prost_types::Duration { seconds: -1, nanos: 0 })),
            "jwtRules.timeout",
        ),
    ];
    for (name, f, field) in errors {
        let err = ok(&*f).expect_err(name);
        assert!(err.contains(field), "{name}: {err}");
    }
    let ra = wp::RequestAuthentication {
        name: "ra".into(),
        namespace: "ns".into(),
        jwt_rules: vec![proto_rule("")],
    };
    let err = RequestAuthentication::try_from(&ra).expect_err("bad rule");
    assert!(err.starts_with("RequestAuthentication ns/ra: jwtRules.issuer"), "{err}");
}

#[test]
fn arbitrary_bytes_never_panic() {
    use rand::{Rng, SeedableRng};
    let good = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &claims(ISS_A));
    let seeds = [
        format!("/p?access_token={good}&x=%zz%\nauthorization: Bearer {good}\ncookie: session={good}; ;=;a\nx-jwt: {good}"),
        "/?access_token=%\nauthorization: bearer\ncookie: session\nx-jwt: ...".into(),
        "\n\n:\nauthorization: Bearer \u{ff}.\u{1}.x".into(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for seed in &seeds {
        fuzz_request_head(seed.as_bytes());
        for _ in 0..3000 {
            let mut bytes = seed.clone().into_bytes();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes[i] = rng.gen(),
                    1 => {
                        bytes.truncate(i);
                    }
                    _ => bytes.insert(i, b"=.;%&:\n "[rng.gen_range(0..8)]),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            fuzz_request_head(&bytes);
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }
    for _ in 0..2000 {
        let len = rng.gen_range(0..300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        fuzz_request_head(&bytes);
        let _ = parse(&String::from_utf8_lossy(&bytes));
        let _ = KeySet::parse(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn key_sets_parse_leniently() {
    let mixed = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
        {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "p521"},
        {"kty": "RSA", "kid": "junk"},
        {"kty": "RSA", "alg": "RSA-OAEP-384", "n": "AQAB", "e": "AQAB", "kid": "enc"},
        jwk(RSA1_JWK, "r1", Some("RS256")),
    ]});
    let set = KeySet::parse(&mixed.to_string()).expect("one good key");
    assert_eq!(set.kids(), vec![Some("r1")]);
    for (json, err) in [
        ("nope", "Jwks is an invalid JSON"),
        ("{}", "Jwks does not have [keys] field"),
        (r#"{"keys": 1}"#, "[keys] in Jwks is not an array"),
        (r#"{"keys": []}"#, "Jwks doesn't have any valid public key"),
    ] {
        assert_eq!(KeySet::parse(json).map(|_| ()), Err(err.to_string()), "{json}");
    }
    let _ = Arc::new(set);
}

/// A verified token is remembered by its key set: seen again it passes without a signature
/// check, but only the very same token (a changed signature is checked, and fails), only while
/// its time and audience still hold, and only for that key set (a refetched set checks again).
#[test]
fn verified_tokens_are_remembered_exactly_and_per_key_set() {
    let a = rule_a();
    let rules = [&a];
    let good = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &claims(ISS_A));
    let KeySource::Inline(set) = &a.keys else { panic!("inline keys") };
    assert!(run(&rules, bearer(&good)).0.is_ok());
    assert!(set.verified.lock().unwrap().contains(&good), "remembered");
    assert!(run(&rules, bearer(&good)).0.is_ok(), "passes again");
    // The same header and payload with another signature is not the remembered token.
    let (head, _) = good.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", b64("not the signature"));
    let refused = run(&rules, bearer(&forged)).0.unwrap_err();
    assert_eq!(refused.code, Status::JwtVerificationFail);
    // Time is checked on every request, remembered or not.
    let old = sign(Algorithm::RS256, RSA1_PRIVATE, Some("r1"), &with(claims(ISS_A), "exp", json!(NOW - 61)));
    set.verified.lock().unwrap().insert(&old);
    assert_eq!(run(&rules, bearer(&old)).0.unwrap_err().code, Status::JwtExpired);
    // A key set parsed again (a refetch) remembers nothing.
    let fresh = KeySet::parse(&jwks(&[jwk(RSA1_JWK, "r1", None)])).unwrap();
    assert!(!fresh.verified.lock().unwrap().contains(&good));
    // Bounded: the oldest goes first.
    let mut cache = VerifiedTokens::default();
    for i in 0..VERIFIED_TOKENS + 10 {
        cache.insert(&format!("token-{i}"));
    }
    assert_eq!(cache.order.len(), VERIFIED_TOKENS);
    assert!(!cache.contains("token-0") && cache.contains(&format!("token-{}", VERIFIED_TOKENS + 9)));
    cache.insert(&"x".repeat(VERIFIED_TOKEN_BYTES + 1));
    assert!(!cache.contains(&"x".repeat(VERIFIED_TOKEN_BYTES + 1)), "too long to keep");
}
