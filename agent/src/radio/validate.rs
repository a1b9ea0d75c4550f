//! The radio's part of a configuration: what this stage can drive (board, channel plan,
//! backend and library variant of this build, the HAL's path limits). Asked by `check.rs`.

use std::path::Path;

use super::boards;
use super::diagnosis::Variant;
use super::region;
use crate::config::{Backend, Config, Invalid, Linked};

/// Every problem of the radio's settings; `linked`: the build they must run on (`None`: any).
pub fn config(cfg: &Config, linked: Option<Linked>) -> Vec<Invalid> {
    let mut out = Vec::new();
    if region::plan(&cfg.region.plan).is_none() {
        out.push(Invalid::new(
            "region.plan",
            format!(
                "unknown channel plan {:?} (known: {})",
                cfg.region.plan,
                region::known().join(", ")
            ),
        ));
    }
    let r = &cfg.radio;
    let board = boards::profile(&r.board);
    if board.is_none() {
        out.push(Invalid::new(
            "radio.board",
            format!(
                "unknown board {:?} (known: {})",
                r.board,
                boards::known().join(", ")
            ),
        ));
    }
    match r.backend {
        Backend::Simulator => match &r.simulator {
            None => out.push(Invalid::new(
                "radio.simulator",
                "backend \"simulator\" needs a simulator file",
            )),
            Some(p) if p.as_os_str().len() > 63 => out.push(Invalid::new(
                "radio.simulator",
                format!(
                    "{} is longer than the 63 bytes the HAL's com_path holds",
                    p.display()
                ),
            )),
            Some(p) if !Path::new(p).is_file() => out.push(Invalid::new(
                "radio.simulator",
                format!("{} does not exist", p.display()),
            )),
            _ => {}
        },
        Backend::SemtechUdp => out.extend(
            super::semtech_udp::check(&r.semtech_udp)
                .into_iter()
                .map(|(key, why)| Invalid::new(key, why)),
        ),
        Backend::Sx1302 => {
            if r.spi_path.len() > 63 {
                out.push(Invalid::new(
                    "radio.spi_path",
                    "longer than the 63 bytes the HAL's com_path holds",
                ));
            }
        }
    }
    let Some(linked) = linked else {
        return out;
    };
    // What this binary cannot do: `run` would only find out at the first start, and retry for
    // ever.
    match (r.backend, linked) {
        (Backend::Sx1302, Linked::Simulator) => out.push(Invalid::new(
            "radio.backend",
            "\"sx1302\" needs a gateway build: this binary links the simulated concentrator \
             (README: building against the real libloragw)",
        )),
        (Backend::Simulator, Linked::Libloragw | Linked::LibloragwUpstream) => {
            out.push(Invalid::new(
                "radio.backend",
                "\"simulator\" is not in this build: it links the real libloragw",
            ))
        }
        _ => {}
    }
    // Upstream V2.1.0 never starts a board without the STTS751.
    if let (Backend::Sx1302, Linked::LibloragwUpstream, Some(b)) = (r.backend, linked, board) {
        if let Err(why) = Variant::Upstream.can_start(b) {
            out.push(Invalid::new("radio.board", why));
        }
    }
    out
}
