//! The read-only grant commands: `requests`, `show` and `grants`.

use clap::Args;

use super::Call;
use crate::control::error::Reply;
use crate::control::requests::{self, Filter};

#[derive(Debug, Args)]
pub struct Requests {
    /// Only requests waiting for a decision.
    #[arg(long)]
    pending: bool,
    /// Only your own requests.
    #[arg(long)]
    mine: bool,
    /// Include decided, expired and revoked requests.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

impl Requests {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        let filter = Filter {
            pending: self.pending,
            mine: self.mine,
            all: self.all,
        };
        requests::list(&call.caller, filter, self.json).await
    }
}

#[derive(Debug, Args)]
pub struct Show {
    id: String,
    #[arg(long)]
    json: bool,
}

impl Show {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        requests::show(&call.caller, &self.id, self.json).await
    }
}

#[derive(Debug, Args)]
pub struct Grants {
    #[arg(long)]
    json: bool,
}

impl Grants {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        requests::grants(&call.caller, self.json).await
    }
}
