//! Who a client is, and what it may publish and subscribe to.
//!
//! `[security.auth]` becomes an [`AuthState`] swapped whole on reload;
//! connections hold the [`Identity`] they logged in as and look it up again
//! when the state changes, so new permissions apply to their next
//! operation and a removed user is disconnected.
//!
//! Secrets never reach a log line. Tokens are compared as SHA-256 digests
//! in constant time, against every configured token; passwords are checked
//! against their argon2 hash off the connection's worker, a few at a time,
//! and an unknown user costs the same check as a known one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use foldhash::HashMap;
use kaelix_core::client::hello_keys;
use kaelix_core::config::{AuthConfig, Permissions};
use kaelix_core::{Topic, TopicPattern};
use subtle::ConstantTimeEq;

/// Who a connection is, with its permissions.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) name: Arc<str>,
    /// Logged in without credentials.
    pub(crate) anonymous: bool,
    pub(crate) publish: Rules,
    pub(crate) subscribe: Rules,
    /// May change the cluster: a user with `admin = true`, or anyone on a
    /// broker without users.
    pub(crate) admin: bool,
}

impl Identity {
    /// Before login: may do nothing.
    pub(crate) fn nobody() -> Arc<Identity> {
        let none = || Rules {
            allow: Vec::new(),
            deny: Vec::new(),
            everything: false,
        };
        Arc::new(Identity {
            name: Arc::from(""),
            anonymous: true,
            publish: none(),
            subscribe: none(),
            admin: false,
        })
    }

    /// "user alice" or "an anonymous client", for refusals.
    pub(crate) fn describe(&self) -> String {
        if self.anonymous {
            "an anonymous client".into()
        } else {
            format!("user {:?}", self.name)
        }
    }
}

/// Allow and deny patterns; deny wins.
#[derive(Debug)]
pub(crate) struct Rules {
    allow: Vec<TopicPattern>,
    deny: Vec<TopicPattern>,
    /// Allowed `>` and denied nothing: no check needed.
    everything: bool,
}

impl Rules {
    fn new(config: &Permissions) -> Result<Rules, String> {
        let parse = |list: &[String]| {
            list.iter()
                .map(|p| TopicPattern::new(p).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
        };
        let allow = parse(&config.allow)?;
        let deny = parse(&config.deny)?;
        let everything = deny.is_empty() && allow.iter().any(|p| p.as_str() == ">");
        Ok(Rules {
            allow,
            deny,
            everything,
        })
    }

    /// Whether every topic is allowed (nothing to check per message).
    pub(crate) fn everything(&self) -> bool {
        self.everything
    }

    /// Whether `topic` is allowed; the refusal says which rule.
    pub(crate) fn permits_topic(&self, topic: &Topic) -> Result<(), String> {
        if self.everything {
            return Ok(());
        }
        if let Some(deny) = self.deny.iter().find(|d| d.matches(topic)) {
            return Err(format!("denied by {deny}"));
        }
        if self.allow.iter().any(|a| a.matches(topic)) {
            return Ok(());
        }
        Err("not allowed".into())
    }

    /// Whether every topic `pattern` can match is allowed.
    pub(crate) fn permits_pattern(&self, pattern: &TopicPattern) -> Result<(), String> {
        if self.everything {
            return Ok(());
        }
        if let Some(deny) = self.deny.iter().find(|d| d.overlaps(pattern)) {
            return Err(format!("it overlaps the denied pattern {deny}"));
        }
        if self.allow.iter().any(|a| a.covers(pattern)) {
            return Ok(());
        }
        Err("no allowed pattern covers it".into())
    }
}

struct User {
    identity: Arc<Identity>,
    /// The argon2 hash in PHC form.
    password: Option<String>,
}

/// `[security.auth]` made ready for logins.
struct AuthState {
    users: HashMap<String, Arc<User>>,
    /// SHA-256 of each token, with its user.
    tokens: Vec<([u8; 32], Arc<User>)>,
    anonymous: Option<Arc<Identity>>,
    certificate_identity: bool,
}

impl AuthState {
    fn new(config: &AuthConfig) -> Result<AuthState, String> {
        let mut users = HashMap::default();
        let mut tokens = Vec::new();
        for user in &config.users {
            let identity = Arc::new(Identity {
                name: Arc::from(user.name.as_str()),
                anonymous: false,
                publish: Rules::new(&user.publish)
                    .map_err(|e| format!("user {:?}: {e}", user.name))?,
                subscribe: Rules::new(&user.subscribe)
                    .map_err(|e| format!("user {:?}: {e}", user.name))?,
                admin: user.admin,
            });
            let entry = Arc::new(User {
                identity,
                password: (!user.password_hash.is_empty()).then(|| user.password_hash.clone()),
            });
            if !user.token.is_empty() {
                tokens.push((digest(&user.token), entry.clone()));
            }
            users.insert(user.name.clone(), entry);
        }
        let anonymous = if config.anonymous_allowed() {
            Some(Arc::new(Identity {
                name: Arc::from("anonymous"),
                anonymous: true,
                publish: Rules::new(&config.anonymous_publish)?,
                subscribe: Rules::new(&config.anonymous_subscribe)?,
                admin: config.users.is_empty(),
            }))
        } else {
            None
        };
        Ok(AuthState {
            users,
            tokens,
            anonymous,
            certificate_identity: config.certificate_identity,
        })
    }
}

fn digest(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What a client presented in HELLO.
pub(crate) enum Login {
    Nothing,
    Token(String),
    Password {
        user: String,
        password: String,
    },
    /// Properties that do not make a login (a user without a password).
    Incomplete(&'static str),
}

impl Login {
    pub(crate) fn from_hello(properties: &[(String, String)]) -> Login {
        let get = |key: &str| {
            properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        match (
            get(hello_keys::TOKEN),
            get(hello_keys::USER),
            get(hello_keys::PASSWORD),
        ) {
            (Some(token), None, None) => Login::Token(token),
            (None, Some(user), Some(password)) => Login::Password { user, password },
            (None, None, None) => Login::Nothing,
            (Some(_), _, _) => Login::Incomplete("a token with a user or password"),
            (None, Some(_), None) => Login::Incomplete("a user without a password"),
            (None, None, Some(_)) => Login::Incomplete("a password without a user"),
        }
    }
}

/// Why a login failed, as counted in `kaelix_auth_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials, and anonymous access is off.
    NoCredentials,
    /// Credentials that do not fit together.
    Malformed,
    /// A token no user has.
    UnknownToken,
    /// A user name no user has.
    UnknownUser,
    /// The wrong password, or a user without one.
    WrongPassword,
    /// A client certificate naming no user, and anonymous access is off.
    UnknownCertificate,
}

impl AuthFailure {
    /// Every reason, in counter order.
    pub const ALL: [AuthFailure; 6] = [
        AuthFailure::NoCredentials,
        AuthFailure::Malformed,
        AuthFailure::UnknownToken,
        AuthFailure::UnknownUser,
        AuthFailure::WrongPassword,
        AuthFailure::UnknownCertificate,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            AuthFailure::NoCredentials => "no_credentials",
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnknownToken => "unknown_token",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::UnknownCertificate => "unknown_certificate",
        }
    }
}

/// The authentication state and its counters.
pub(crate) struct Auth {
    state: ArcSwap<AuthState>,
    /// Bumped by each change; connections watch it.
    changes: tokio::sync::watch::Sender<u64>,
    /// Password checks running at once: argon2 spends memory and CPU on
    /// purpose, and a flood of logins must not take every core.
    verifying: tokio::sync::Semaphore,
    failures: [AtomicU64; AuthFailure::ALL.len()],
}

impl Auth {
    pub(crate) fn new(config: &AuthConfig) -> Auth {
        // The configuration was validated; a state that still does not
        // build (it cannot, short of a bug) serves nobody rather than everybody.
        let state = AuthState::new(config).unwrap_or_else(|err| {
            tracing::error!("security.auth unusable, no client can log in: {err}");
            AuthState {
                users: HashMap::default(),
                tokens: Vec::new(),
                anonymous: None,
                certificate_identity: false,
            }
        });
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Auth {
            state: ArcSwap::from_pointee(state),
            changes: tokio::sync::watch::Sender::new(0),
            verifying: tokio::sync::Semaphore::new(cpus.div_ceil(2)),
            failures: Default::default(),
        }
    }

    /// Applies a reloaded `[security.auth]`.
    pub(crate) fn apply(&self, config: &AuthConfig) -> Result<(), String> {
        let state = AuthState::new(config)?;
        self.state.store(Arc::new(state));
        self.changes.send_modify(|generation| *generation += 1);
        Ok(())
    }

    /// Notified on each change of the state.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The state now in force's version of `identity`: its new
    /// permissions, or `None` when it may no longer connect.
    pub(crate) fn refresh(&self, identity: &Identity) -> Option<Arc<Identity>> {
        let state = self.state.load();
        if identity.anonymous {
            return state.anonymous.clone();
        }
        state
            .users
            .get(identity.name.as_ref())
            .map(|user| user.identity.clone())
    }

    /// Login failures so far, by reason.
    pub(crate) fn failures(&self) -> Vec<(&'static str, u64)> {
        AuthFailure::ALL
            .iter()
            .zip(&self.failures)
            .map(|(f, n)| (f.name(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Who a client is: from its token or password, else its certificate
    /// (when `certificate_identity` is on), else anonymous when allowed.
    /// A failure is counted; the caller logs it.
    pub(crate) async fn authenticate(
        &self,
        login: Login,
        certificate: Option<&str>,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let result = self.check(login, certificate).await;
        if let Err(failure) = result {
            self.failures[failure as usize].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn check(
        &self,
        login: Login,
        certificate: Option<&str>,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let state = self.state.load_full();
        match login {
            Login::Incomplete(_) => Err(AuthFailure::Malformed),
            Login::Token(token) => {
                let presented = digest(&token);
                // Every token is compared, equal or not.
                let mut found = None;
                for (digest, user) in &state.tokens {
                    if bool::from(digest.ct_eq(&presented)) {
                        found = Some(user.identity.clone());
                    }
                }
                found.ok_or(AuthFailure::UnknownToken)
            }
            Login::Password { user, password } => {
                let entry = state.users.get(&user).cloned();
                let hash = entry
                    .as_ref()
                    .and_then(|u| u.password.clone())
                    .unwrap_or_else(|| decoy_hash().to_string());
                let ok = self.verify(password, hash).await;
                match entry {
                    None => Err(AuthFailure::UnknownUser),
                    Some(u) if ok && u.password.is_some() => Ok(u.identity.clone()),
                    Some(_) => Err(AuthFailure::WrongPassword),
                }
            }
            Login::Nothing => {
                if let Some(name) = certificate.filter(|_| state.certificate_identity) {
                    if let Some(user) = state.users.get(name) {
                        return Ok(user.identity.clone());
                    }
                    return state
                        .anonymous
                        .clone()
                        .ok_or(AuthFailure::UnknownCertificate);
                }
                state.anonymous.clone().ok_or(AuthFailure::NoCredentials)
            }
        }
    }

    /// Checks `password` against an argon2 `hash` on the blocking pool.
    async fn verify(&self, password: String, hash: String) -> bool {
        let Ok(_permit) = self.verifying.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// A hash of nothing anyone knows, checked for unknown users so that they
/// cost what a known user costs.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password("an unknown user's password").unwrap_or_default())
}

/// An argon2id hash of `password` in PHC form, with a random salt and the
/// crate's default cost (19 MiB, 2 passes): what `kaelix passwd` prints.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_core::config::UserConfig;

    fn perms(allow: &[&str], deny: &[&str]) -> Permissions {
        Permissions {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn deny_wins_and_patterns_must_be_covered() {
        let rules = Rules::new(&perms(&["orders.>", "audit.read"], &["orders.admin.>"])).unwrap();
        let topic = |s| Topic::new(s).unwrap();
        let pattern = |s| TopicPattern::new(s).unwrap();
        assert!(rules.permits_topic(&topic("orders.eu.new")).is_ok());
        assert!(rules.permits_topic(&topic("audit.read")).is_ok());
        let err = rules
            .permits_topic(&topic("orders.admin.drop"))
            .unwrap_err();
        assert_eq!(err, "denied by orders.admin.>");
        assert!(rules.permits_topic(&topic("billing.x")).is_err());
        assert!(rules.permits_pattern(&pattern("orders.eu.*")).is_ok());
        let err = rules.permits_pattern(&pattern("orders.>")).unwrap_err();
        assert!(err.contains("orders.admin.>"), "{err}");
        assert!(rules.permits_pattern(&pattern(">")).is_err());
        assert!(!rules.everything());
        assert!(Rules::new(&Permissions::everything()).unwrap().everything());
        assert!(Rules::new(&perms(&[], &[]))
            .unwrap()
            .permits_topic(&topic("a"))
            .is_err());
    }

    fn config(users: Vec<UserConfig>, anonymous: Option<bool>) -> AuthConfig {
        AuthConfig {
            anonymous,
            users,
            ..AuthConfig::default()
        }
    }

    #[tokio::test]
    async fn tokens_passwords_and_anonymous() {
        let alice = UserConfig {
            name: "alice".into(),
            password_hash: hash_password("correct horse").unwrap(),
            publish: perms(&["a.>"], &[]),
            ..UserConfig::default()
        };
        let svc = UserConfig {
            name: "svc".into(),
            token: "0123456789abcdef-token".into(),
            ..UserConfig::default()
        };
        let auth = Auth::new(&config(vec![alice, svc], None));
        let password = |user: &str, password: &str| Login::Password {
            user: user.into(),
            password: password.into(),
        };
        let who = auth
            .authenticate(password("alice", "correct horse"), None)
            .await
            .unwrap();
        assert_eq!(&*who.name, "alice");
        assert_eq!(
            auth.authenticate(password("alice", "wrong"), None)
                .await
                .unwrap_err(),
            AuthFailure::WrongPassword
        );
        assert_eq!(
            auth.authenticate(password("bob", "x"), None)
                .await
                .unwrap_err(),
            AuthFailure::UnknownUser
        );
        // svc has no password: a password login as svc fails.
        assert_eq!(
            auth.authenticate(password("svc", ""), None)
                .await
                .unwrap_err(),
            AuthFailure::WrongPassword
        );
        let who = auth
            .authenticate(Login::Token("0123456789abcdef-token".into()), None)
            .await
            .unwrap();
        assert_eq!(&*who.name, "svc");
        assert_eq!(
            auth.authenticate(Login::Token("nope".into()), None)
                .await
                .unwrap_err(),
            AuthFailure::UnknownToken
        );
        // Users are configured and anonymous is unset: no anonymous access.
        assert_eq!(
            auth.authenticate(Login::Nothing, None).await.unwrap_err(),
            AuthFailure::NoCredentials
        );
        let failures = auth.failures();
        assert!(failures.contains(&("wrong_password", 2)), "{failures:?}");

        // A reload opens anonymous access and removes svc.
        auth.apply(&config(vec![], Some(true))).unwrap();
        let anon = auth.authenticate(Login::Nothing, None).await.unwrap();
        assert!(anon.anonymous && anon.publish.everything());
        assert!(auth.refresh(&who).is_none(), "svc was removed");
        assert!(auth.refresh(&anon).is_some());
    }

    #[tokio::test]
    async fn a_certificate_names_a_user_when_asked_to() {
        let mut cfg = config(
            vec![UserConfig {
                name: "orders-service".into(),
                ..UserConfig::default()
            }],
            Some(false),
        );
        let auth = Auth::new(&cfg);
        // Not enabled: the certificate's name is not an identity.
        assert_eq!(
            auth.authenticate(Login::Nothing, Some("orders-service"))
                .await
                .unwrap_err(),
            AuthFailure::NoCredentials
        );
        cfg.certificate_identity = true;
        auth.apply(&cfg).unwrap();
        let who = auth
            .authenticate(Login::Nothing, Some("orders-service"))
            .await
            .unwrap();
        assert_eq!(&*who.name, "orders-service");
        assert_eq!(
            auth.authenticate(Login::Nothing, Some("stranger"))
                .await
                .unwrap_err(),
            AuthFailure::UnknownCertificate
        );
    }

    #[test]
    fn hello_properties_make_a_login() {
        let props = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert!(matches!(Login::from_hello(&[]), Login::Nothing));
        assert!(matches!(
            Login::from_hello(&props(&[("token", "t")])),
            Login::Token(t) if t == "t"
        ));
        assert!(matches!(
            Login::from_hello(&props(&[("user", "u"), ("password", "p")])),
            Login::Password { .. }
        ));
        assert!(matches!(
            Login::from_hello(&props(&[("user", "u")])),
            Login::Incomplete(_)
        ));
    }
}
