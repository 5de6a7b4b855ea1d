//! Injected I/O errors: a backend wrapper that fails chosen operations.
//!
//! This module owns [`FaultPlan`], a list of rules saying which operation fails, after how many
//! attempts, with which errno and whether it keeps failing, and [`FaultBackend`], which consults
//! a shared plan before every operation of the backend it wraps. A failed operation never
//! reaches the wrapped backend, so it changes nothing.
//!
//! Counters belong to the plan, not to a backend: several backends sharing one plan (a pool's
//! metadata and data files) count their operations together.

use hpm_io::Backend;
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

/// The operations a rule can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `sync`.
    Sync,
    /// `punch`.
    Punch,
    /// `set_len`.
    SetLen,
    /// Any of `write_at`, `sync`, `punch` and `set_len`, counted together.
    AnyMutation,
}

impl Op {
    fn slot(self) -> usize {
        self as usize
    }

    fn is_mutation(self) -> bool {
        !matches!(self, Op::Read)
    }
}

/// The error an injected failure reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    /// EIO: the device failed.
    Eio,
    /// ENOSPC: no space left on the device.
    Enospc,
}

impl Errno {
    /// The Linux errno value (stable across Linux architectures).
    pub const fn code(self) -> i32 {
        match self {
            Errno::Eio => 5,
            Errno::Enospc => 28,
        }
    }

    /// The error as the OS would report it.
    pub fn error(self) -> io::Error {
        io::Error::from_raw_os_error(self.code())
    }
}

/// One rule of a [`FaultPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The operation that fails.
    pub op: Op,
    /// How many attempts of `op` succeed before the first failure.
    pub after: u64,
    /// What the failure reports.
    pub errno: Errno,
    /// Whether every later attempt fails too, or only the one.
    pub persistent: bool,
}

#[derive(Debug)]
struct Armed {
    rule: Rule,
    /// The plan's counter of `rule.op` when the rule was added: `after` counts from there.
    base: u64,
}

#[derive(Debug, Default)]
struct PlanState {
    rules: Vec<Armed>,
    /// Attempts per `Op::slot`, failed ones included.
    counts: [u64; 6],
    injected: u64,
}

/// Which operations fail, shared by every [`FaultBackend`] that uses it.
#[derive(Debug, Default)]
pub struct FaultPlan {
    state: Mutex<PlanState>,
}

impl FaultPlan {
    /// A plan with no rules: nothing fails.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule (builder style): `op` fails once its attempt counter reaches `after + 1`,
    /// with `errno`; if `persistent`, every later attempt fails too.
    pub fn fail(self, op: Op, after: u64, errno: Errno, persistent: bool) -> Self {
        self.add(Rule {
            op,
            after,
            errno,
            persistent,
        });
        self
    }

    /// Adds a rule to a plan that may be in use; its `after` counts attempts from now.
    pub fn add(&self, rule: Rule) {
        let mut st = self.state.lock();
        let base = st.counts[rule.op.slot()];
        st.rules.push(Armed { rule, base });
    }

    /// Removes every rule: the disk is healthy again. Counters are kept.
    pub fn clear(&self) {
        self.state.lock().rules.clear();
    }

    /// How many operations have failed by injection.
    pub fn injected(&self) -> u64 {
        self.state.lock().injected
    }

    /// How many attempts of `op` were made, failed ones included.
    pub fn count(&self, op: Op) -> u64 {
        self.state.lock().counts[op.slot()]
    }

    /// Counts an attempt of `op` (never `AnyMutation`) and fails it if a rule says so. When
    /// several rules trigger on the same attempt, the first added gives the errno.
    fn check(&self, op: Op) -> io::Result<()> {
        let mut st = self.state.lock();
        st.counts[op.slot()] += 1;
        if op.is_mutation() {
            st.counts[Op::AnyMutation.slot()] += 1;
        }
        let hit = st.rules.iter().find_map(|a| {
            let r = a.rule;
            let applies = r.op == op || (r.op == Op::AnyMutation && op.is_mutation());
            if !applies {
                return None;
            }
            // `n` is this attempt's number (1-based) since the rule was added, so a rule
            // with `after` lets exactly `after` attempts through first.
            let n = st.counts[r.op.slot()] - a.base;
            let fires = if r.persistent {
                n > r.after
            } else {
                n == r.after + 1
            };
            fires.then_some(r.errno)
        });
        match hit {
            Some(errno) => {
                st.injected += 1;
                Err(errno.error())
            }
            None => Ok(()),
        }
    }
}

/// A backend whose operations fail as its [`FaultPlan`] says. `len` and `allocated_bytes`
/// never fail.
#[derive(Clone, Debug)]
pub struct FaultBackend<B: Backend> {
    inner: B,
    plan: Arc<FaultPlan>,
}

impl<B: Backend> FaultBackend<B> {
    /// Wraps `inner`, failing what `plan` says.
    pub fn new(inner: B, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The plan this backend consults.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }
}

impl<B: Backend> Backend for FaultBackend<B> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.plan.check(Op::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.plan.check(Op::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.plan.check(Op::Sync)?;
        self.inner.sync()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.plan.check(Op::Punch)?;
        self.inner.punch(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.plan.check(Op::SetLen)?;
        self.inner.set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
}

/// A backend wrapper that panics, once per arming, in the next `read_at` or `write_at` of the
/// wrapped backend (the operation never reaches it): for the tests of what a panic in the
/// middle of the engine's work leaves behind.
pub struct PanicBackend {
    inner: Arc<dyn Backend>,
    next_read: AtomicBool,
    next_write: AtomicBool,
}

impl PanicBackend {
    /// Wraps `inner`, disarmed.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Self {
            inner,
            next_read: false.into(),
            next_write: false.into(),
        }
    }

    /// The next `read_at` panics.
    pub fn panic_on_next_read(&self) {
        self.next_read.store(true, SeqCst);
    }

    /// The next `write_at` panics.
    pub fn panic_on_next_write(&self) {
        self.next_write.store(true, SeqCst);
    }

    /// Nothing panics any more.
    pub fn disarm(&self) {
        self.next_read.store(false, SeqCst);
        self.next_write.store(false, SeqCst);
    }
}

impl Backend for PanicBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.next_read.swap(false, SeqCst) {
            panic!("injected panic: read of {} bytes at {offset}", buf.len());
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.next_write.swap(false, SeqCst) {
            panic!("injected panic: write of {} bytes at {offset}", buf.len());
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpm_io::MemBackend;

    fn wrap(plan: &Arc<FaultPlan>) -> FaultBackend<MemBackend> {
        FaultBackend::new(MemBackend::new(), Arc::clone(plan))
    }

    #[test]
    fn once_rule_fails_exactly_the_after_plus_first_attempt() {
        let plan = Arc::new(FaultPlan::new().fail(Op::Sync, 3, Errno::Eio, false));
        let b = wrap(&plan);
        let results: Vec<bool> = (0..6).map(|_| b.sync().is_ok()).collect();
        assert_eq!(results, [true, true, true, false, true, true]);
        assert_eq!(plan.injected(), 1);
        assert_eq!(plan.count(Op::Sync), 6);
    }

    #[test]
    fn persistent_rule_keeps_failing_with_its_errno() {
        let plan = Arc::new(FaultPlan::new().fail(Op::Write, 1, Errno::Enospc, true));
        let b = wrap(&plan);
        b.write_at(b"a", 0).unwrap();
        for _ in 0..3 {
            let e = b.write_at(b"b", 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(28));
        }
        assert_eq!(plan.injected(), 3);
        // Failed writes never reached the inner backend; other operations still work.
        let mut buf = [0u8; 1];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"a");
        b.sync().unwrap();
    }

    #[test]
    fn backends_sharing_a_plan_count_together() {
        let plan = Arc::new(FaultPlan::new().fail(Op::Write, 2, Errno::Eio, false));
        let (a, b) = (wrap(&plan), wrap(&plan));
        a.write_at(b"1", 0).unwrap();
        b.write_at(b"2", 0).unwrap();
        assert_eq!(a.write_at(b"3", 0).unwrap_err().raw_os_error(), Some(5));
        b.write_at(b"4", 0).unwrap();
    }

    #[test]
    fn any_mutation_counts_every_kind_but_reads() {
        let plan = Arc::new(FaultPlan::new().fail(Op::AnyMutation, 3, Errno::Eio, true));
        let b = wrap(&plan);
        let mut buf = [0u8; 4];
        b.write_at(b"x", 0).unwrap();
        b.read_at(&mut buf, 0).unwrap();
        b.punch(0, 1).unwrap();
        b.set_len(10).unwrap();
        assert!(b.sync().is_err());
        assert!(b.write_at(b"y", 0).is_err());
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(b.len().unwrap(), 10);
        assert_eq!(plan.count(Op::AnyMutation), 5);
    }

    #[test]
    fn rules_added_later_count_from_then_and_clear_heals() {
        let plan = Arc::new(FaultPlan::new());
        let b = wrap(&plan);
        for _ in 0..5 {
            b.punch(0, 1).unwrap();
        }
        plan.add(Rule {
            op: Op::Punch,
            after: 1,
            errno: Errno::Eio,
            persistent: true,
        });
        b.punch(0, 1).unwrap();
        assert!(b.punch(0, 1).is_err());
        plan.clear();
        b.punch(0, 1).unwrap();
        assert_eq!(plan.injected(), 1);
    }

    #[test]
    fn first_triggering_rule_gives_the_errno() {
        let plan = Arc::new(
            FaultPlan::new()
                .fail(Op::Read, 0, Errno::Enospc, false)
                .fail(Op::Read, 0, Errno::Eio, true),
        );
        let b = wrap(&plan);
        let mut buf = [0u8; 1];
        assert_eq!(b.read_at(&mut buf, 0).unwrap_err().raw_os_error(), Some(28));
        assert_eq!(b.read_at(&mut buf, 0).unwrap_err().raw_os_error(), Some(5));
        assert_eq!(plan.injected(), 2);
    }
}
