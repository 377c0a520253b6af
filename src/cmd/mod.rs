//! One module per noun of the command line (`tandem <noun> <verb>`).

pub mod admin;
pub mod agent;
pub mod demo;
pub mod desktop;
pub mod guest;
pub mod image;
pub mod scan;
pub mod server;
pub mod store;
pub mod vm;
