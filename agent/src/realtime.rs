//! Raised scheduling for the threads whose timing is the radio's: the receive loop and the
//! downlink hand-off (40 ms before a transmission; late is a lost downlink). On a gateway
//! shared with other processes, a busy CPU must not delay them.
//!
//! SCHED_FIFO needs CAP_SYS_NICE or an RLIMIT_RTPRIO allowance (the systemd unit grants it with
//! `LimitRTPRIO=`/`AmbientCapabilities=CAP_SYS_NICE`). Without either, the thread keeps normal
//! scheduling and says so once: the agent works, with less margin under load.

use thread_priority::unix::{
    set_thread_priority_and_policy, thread_native_id, RealtimeThreadSchedulePolicy,
    ThreadSchedulePolicy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// Puts the calling thread under SCHED_FIFO at `priority` (1-99); 0 leaves it as it is.
pub fn raise_current_thread(name: &str, priority: u8) {
    if priority == 0 {
        return;
    }
    let Ok(value) = ThreadPriorityValue::try_from(priority.min(99)) else {
        return;
    };
    match set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Crossplatform(value),
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    ) {
        Ok(()) => tracing::info!(thread = name, priority, "real-time scheduling (SCHED_FIFO)"),
        Err(e) => tracing::warn!(
            thread = name,
            error = ?e,
            "real-time scheduling refused (needs CAP_SYS_NICE or LimitRTPRIO): normal priority, less margin under CPU load"
        ),
    }
}
