//! Routes grouped by who calls them. A group is the only way a route enters the API, and adding
//! routes to a group names their credential: the group wraps them in that credential's route layer
//! ([`Credential::guard`]) and refuses credentials its callers do not use, so an operator route is
//! behind the admin key by construction.

use axum::Router;

use super::AppState;
use super::auth::Credential;

/// Who calls a group of routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Anyone: health, statistics, the API document.
    Public,
    /// Build machines: workers, their VMs and host monitors.
    Worker,
    /// Whoever submits a build and then follows it with its token (or the admin key).
    Submitter,
    /// Operators: the admin API, `/api/v2`, metrics.
    Operator,
}

impl Caller {
    pub const ALL: [Caller; 4] = [Caller::Public, Caller::Worker, Caller::Submitter, Caller::Operator];

    pub fn name(self) -> &'static str {
        match self {
            Caller::Public => "public",
            Caller::Worker => "worker",
            Caller::Submitter => "submitter",
            Caller::Operator => "operator",
        }
    }

    /// The credentials routes of this group may demand.
    pub fn credentials(self) -> &'static [Credential] {
        match self {
            Caller::Public => &[Credential::Public],
            Caller::Worker => &[
                Credential::AdminOrWorkerToken,
                Credential::WorkerTokenOrAdmin,
                Credential::Upload,
                Credential::WorkerToken,
                Credential::BuildScoped,
                Credential::VmToken,
                Credential::Otp,
            ],
            Caller::Submitter => &[Credential::Admin, Credential::Owner],
            Caller::Operator => &[Credential::Admin, Credential::AdminOrBearer],
        }
    }
}

/// The routes of one caller group.
pub struct Group {
    caller: Caller,
    state: AppState,
    router: Router<AppState>,
}

impl Group {
    pub fn new(caller: Caller, state: &AppState) -> Self {
        Self {
            caller,
            state: state.clone(),
            router: Router::new(),
        }
    }

    /// Adds routes behind `credential`'s layer. A credential the group's callers do not use is a
    /// programming error, caught when the router is built (at start-up and by every test).
    pub fn routes(mut self, credential: Credential, routes: Router<AppState>) -> Self {
        assert!(
            self.caller.credentials().contains(&credential),
            "{credential:?} is not a credential of the {} group",
            self.caller.name()
        );
        let guarded = match credential {
            Credential::Public | Credential::Otp => routes,
            _ => routes.route_layer(axum::middleware::from_fn_with_state(
                (self.state.clone(), credential),
                Credential::guard,
            )),
        };
        self.router = self.router.merge(guarded);
        self
    }

    pub fn into_router(self) -> Router<AppState> {
        self.router
    }
}
