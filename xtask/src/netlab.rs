//! `cargo xtask netlab TOPOLOGY [--hosts N] [--mbit N] [--hold]`: builds one of the namespace
//! topologies the tests and benches share (see `starling_tests::netlab`), checks its path MTU
//! with DF pings from a client to the server, prints the layout, and tears it down (after
//! Enter, with `--hold`). `cargo xtask netlab list` names them.

use anyhow::{bail, Context, Result};
use starling_tests::is_root;
use starling_tests::netlab::{self, Topology};

#[derive(clap::Args)]
pub struct Args {
    /// clean, dind, vxlan, jumbo or lossy; `list` describes them.
    topology: String,
    /// Hosts in the topology.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Every host link's rate, each way (tbf).
    #[arg(long, default_value_t = 1000)]
    mbit: u32,
    /// Keep it up until Enter is pressed.
    #[arg(long)]
    hold: bool,
}

pub fn run(args: Args) -> Result<()> {
    let name = args.topology.as_str();
    if name == "list" {
        for t in Topology::ALL {
            println!(
                "{:6} path MTU {:5}, loss {:.0}%",
                t.name(),
                t.path_mtu(),
                t.loss() * 100.0
            );
        }
        return Ok(());
    }
    let topo = Topology::parse(name).with_context(|| {
        format!("unknown topology {name:?}: use clean, dind, vxlan, jumbo, lossy or list")
    })?;
    let Args {
        hosts, mbit, hold, ..
    } = args;
    if !is_root() {
        bail!("netlab builds network namespaces: run it as root");
    }
    let lab = netlab::build("x", 230, hosts.max(2), mbit, topo).map_err(anyhow::Error::msg)?;
    println!(
        "netlab {}: {} hosts, {mbit} Mbit/s links (tbf both ways)",
        topo.name(),
        lab.hosts.len()
    );
    for (i, h) in lab.hosts.iter().enumerate() {
        let side = if i == 0 { "server side" } else { "client side" };
        println!("  host {i}: netns {} addr {} ({side})", h.ns, h.addr);
    }
    let server = lab.hosts[0].addr.clone();
    let mtu = topo.path_mtu();
    let at = netlab::df_ping(&lab, 1, &server, mtu);
    let over = netlab::df_ping(&lab, 1, &server, mtu + 1);
    println!(
        "  DF ping host 1 -> host 0: {mtu} bytes {}, {} bytes {}",
        if at { "passes" } else { "FAILS" },
        mtu + 1,
        if over { "PASSES" } else { "fails" }
    );
    if hold {
        println!("held; press Enter to tear it down");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    drop(lab);
    if !at || over {
        bail!(
            "the {} topology does not have its path MTU of {mtu}",
            topo.name()
        );
    }
    Ok(())
}
