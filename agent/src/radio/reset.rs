//! Board reset through the GPIO character device, before `lgw_start` (which does not reset).

use std::thread::sleep;
use std::time::Duration;

use gpiocdev::line::Value;
use gpiocdev::Request;

use super::boards::BoardProfile;

/// Holds the lines for the life of the radio: dropping the request would return them to
/// their default state, which on some boards holds the SX1302 in reset.
pub struct ResetLines {
    _request: Request,
}

/// Power enable high, then a reset pulse (high, then low), 100 ms steps.
pub fn reset(chip: &str, board: &BoardProfile) -> Result<ResetLines, gpiocdev::Error> {
    let mut lines = vec![board.sx1302_reset];
    lines.extend(board.power_enable);
    lines.extend(board.sx1261_reset);
    let request = Request::builder()
        .on_chip(chip)
        .with_consumer("lora-edge")
        .with_lines(&lines)
        .as_output(Value::Inactive)
        .request()?;
    if let Some(p) = board.power_enable {
        request.set_value(p, Value::Active)?;
        sleep(Duration::from_millis(100));
    }
    request.set_value(board.sx1302_reset, Value::Active)?;
    if let Some(r) = board.sx1261_reset {
        request.set_value(r, Value::Active)?;
    }
    sleep(Duration::from_millis(100));
    request.set_value(board.sx1302_reset, Value::Inactive)?;
    if let Some(r) = board.sx1261_reset {
        request.set_value(r, Value::Inactive)?;
    }
    sleep(Duration::from_millis(100));
    Ok(ResetLines { _request: request })
}
