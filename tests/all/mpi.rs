//! Training on several processes launched by MPI (the `mpi` feature; `./scripts/test` installs Open MPI and builds
//! with it), by `mpirun` and, where a Slurm cluster answers, by `srun`: two ranks on this machine take the updates
//! of one process with `--grad-accum 2`, a rank killed mid-run ends the job within a bounded time, and `--resume`
//! continues from the last checkpoint to the same weights as an uninterrupted run; ranks that run different
//! settings, and bf16 sums (NCCL's), are refused; a rank that fails before joining ends the others.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lfm::checkpoint::read_weights;

use crate::common::*;
use crate::train::{losses, setup, train_args};

/// How two ranks are started: `mpirun`, or Slurm's `srun` (through PMIx) where a Slurm cluster answers.
#[derive(Clone, Copy)]
enum Launcher {
    Mpirun,
    Srun,
}

impl Launcher {
    /// Two ranks of `lfm` with `args`, allowed to run as root (CI) and on more ranks than cores; `marker` tags the
    /// processes' environment.
    fn command(self, args: &[&str], marker: &str) -> Command {
        let mut command = match self {
            Launcher::Mpirun => {
                let mut command = mpirun();
                command.args(["-np", "2"]);
                command
            }
            Launcher::Srun => {
                let mut command = Command::new("srun");
                command.args(["--mpi=pmix", "-n", "2", "--overcommit"]);
                command
            }
        };
        command.arg(lfm_bin()).args(args);
        with_test_environment(command, marker)
    }

    /// The variable that holds a process's rank under this launcher.
    fn rank_variable(self) -> &'static str {
        match self {
            Launcher::Mpirun => "OMPI_COMM_WORLD_RANK",
            Launcher::Srun => "SLURM_PROCID",
        }
    }

    /// What the launcher prints when rank 1 was killed by SIGKILL.
    fn lost_rank_1(self) -> &'static [&'static str] {
        match self {
            Launcher::Mpirun => &["rank 1", "signal 9"],
            Launcher::Srun => &["task 1: Killed"],
        }
    }
}

/// `mpirun` allowed to run as root (CI) and on more ranks than cores.
fn mpirun() -> Command {
    let mut command = Command::new("mpirun");
    command.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").arg("--oversubscribe");
    command
}

/// An MPMD `mpirun`: rank 0 runs `lfm` with `first`, rank 1 with `second`.
fn mpirun_mpmd(first: &[&str], second: &[&str], marker: &str) -> Command {
    let mut command = mpirun();
    command.args(["-np", "1"]).arg(lfm_bin()).args(first);
    command.args([":", "-np", "1"]).arg(lfm_bin()).args(second);
    with_test_environment(command, marker)
}

/// Shared memory without cross-memory attach (containers often forbid it: ptrace rules), `marker` in the environment
/// (to find the ranks' processes), no torchrun variables from the caller, and piped output.
fn with_test_environment(mut command: Command, marker: &str) -> Command {
    command.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none").env("LFM_TEST_MARKER", marker);
    for variable in ["WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        command.env_remove(variable);
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// The process of rank `rank` under `launcher` whose environment carries `marker`.
fn rank_process(launcher: Launcher, rank: usize, marker: &str) -> Option<u32> {
    let want_rank = format!("{}={rank}", launcher.rank_variable());
    let want_marker = format!("LFM_TEST_MARKER={marker}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        let has = |v: &str| vars.contains(&v.as_bytes());
        (has(&want_rank) && has(&want_marker)).then_some(pid)
    })
}

fn weights(out: &Path) -> lfm::checkpoint::TensorMap {
    read_weights(&out.join("model.safetensors")).unwrap().tensors
}

#[test]
fn two_mpi_ranks_train_as_two_micro_batches_and_resume_after_a_killed_rank() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        panic!("mpirun was not found: the `mpi` feature's tests need an MPI launcher (apt-get install openmpi-bin)");
    }
    kill_and_resume(Launcher::Mpirun);
}

/// The same under Slurm's `srun --mpi=pmix`, where a Slurm cluster answers (`sinfo`); CI has none, so there it skips.
#[test]
fn two_srun_tasks_train_as_two_micro_batches_and_resume_after_a_killed_task() {
    let answers = Command::new("sinfo").arg("--noheader").output().is_ok_and(|o| o.status.success());
    if !answers {
        eprintln!("skipped: no Slurm cluster answers `sinfo` (this test runs `srun --mpi=pmix -n 2` where one does)");
        return;
    }
    kill_and_resume(Launcher::Srun);
}

/// Two ranks against one process with `--grad-accum 2`: rank 1 is SIGKILLed once a checkpoint past step 10 exists,
/// the job must end within a bounded time naming it, and the same command with `--resume` must end with the weights
/// and losses of the single process.
fn kill_and_resume(launcher: Launcher) {
    let s = setup();
    let steps = ["--max-steps", "40", "--save-every", "5", "--max-grad-norm", "0.5"];
    // One process, each step's batch as two micro-batches.
    let one = s.root.join("one");
    let mut args = train_args(one.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&steps);
    args.extend_from_slice(&["--grad-accum", "2"]);
    let (ok, _, stderr) = lfm(&args);
    assert!(ok, "{stderr}");

    // Two ranks, rank 1 killed (SIGKILL) once a checkpoint past step 10 is on disk.
    let two = s.root.join("two");
    let mut args = train_args(two.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&steps);
    let marker = format!("kill-{}", std::process::id());
    let mut job = launcher.command(&args, &marker).spawn().expect("the launcher starts");
    let killed_at = loop {
        if let Ok(Some(state)) = lfm::train::state::read_state(&two) {
            if state.step >= 10 {
                if let Some(pid) = rank_process(launcher, 1, &marker) {
                    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
                    assert!(killed.success());
                    break state.step;
                }
            }
        }
        assert!(job.try_wait().unwrap().is_none(), "the job ended before a rank could be killed");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(killed_at < 40, "killed at step {killed_at}");
    let since = Instant::now();
    let output = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the job goes on without rank 1: {stderr}");
    assert!(since.elapsed() < Duration::from_secs(60), "the job took {:?} to stop", since.elapsed());
    let named = launcher.lost_rank_1().iter().all(|part| stderr.contains(part));
    assert!(named, "the launcher names the lost rank: {stderr}");
    let saved = lfm::train::state::read_state(&two).unwrap().unwrap().step;
    assert!((10..40).contains(&saved), "the last checkpoint is at step {saved}");

    // The same command with --resume continues to the weights of one process with two micro-batches.
    args.push("--resume");
    let output = launcher.command(&args, &marker).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("gradients summed by MPI"), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("rank 1 of 2: trained 40 steps"));
    let (one_weights, two_weights) = (weights(&one), weights(&two));
    assert_eq!(one_weights.len(), two_weights.len());
    for (key, tensor) in &one_weights {
        let what = format!("{key} after 40 steps on two ranks (rank 1 killed at step {killed_at})");
        assert_close(&what, &two_weights[key].to_f32(), &tensor.to_f32(), 1e-6, 1e-7);
    }
    let logged = losses(&two);
    assert_eq!(logged.len(), 40, "one loss per step in metrics.jsonl");
    assert_close_f64("losses on two ranks", &logged, &losses(&one), 1e-6);
    let reduced = crate::train::metric(&two, "allreduce_bytes");
    assert!(!reduced.is_empty() && reduced.iter().all(|&b| b > 0.0), "{reduced:?}");
}

/// Runs `mpirun` of two ranks (rank 1 with `second`'s arguments where given) and checks that the job fails within
/// 60 s with `expected` in its output.
fn refused_under_mpirun(first: &[&str], second: Option<&[&str]>, marker: &str, expected: &str) {
    let started = Instant::now();
    let mut command = match second {
        Some(second) => mpirun_mpmd(first, second, marker),
        None => Launcher::Mpirun.command(first, marker),
    };
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

#[test]
fn mpi_ranks_with_different_settings_are_refused() {
    let s = setup();
    let out = s.root.join("mismatch");
    let mut first = train_args(out.to_str().unwrap(), &s.data, &s.vae, &s.vae_config, &s.config);
    let mut second = first.clone();
    first.extend_from_slice(&["--max-steps", "2"]);
    second.extend_from_slice(&["--max-steps", "3"]);
    let expected = "rank(s) 1 train another model, settings or data than rank 0";
    refused_under_mpirun(&first, Some(&second), "mismatch", expected);
    // bf16 sums are NCCL's: MPI sums f32.
    let mut bf16 = first.clone();
    bf16.extend_from_slice(&["--allreduce-dtype", "bf16"]);
    refused_under_mpirun(&bf16, None, "bf16", "--allreduce-dtype bf16 needs NCCL");
    // A rank that fails before it joins the others (here: no CUDA device for it, or no CUDA in this build) ends them
    // too, naming itself: without MPI_Abort, rank 0 would wait for it in MPI forever under `srun` (mpirun would end
    // it, unnamed).
    if lfm::backend::select(lfm::backend::BackendChoice::Cuda).is_err() {
        let mut second = first.clone();
        second[1] = "cuda";
        let why = if cfg!(feature = "cuda") { "no usable CUDA device" } else { "this lfm was built without CUDA" };
        refused_under_mpirun(&first, Some(&second), "no-device", &format!("Error: rank 1: {why}"));
    }
}
