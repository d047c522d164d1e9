//! Runs the `lazyadam-mpi-check` binary (built by cargo for these tests) under
//! `mpirun -np 4`, and alone as one rank (MPI's singleton initialization).
//! Skipped, with the reason printed, when `mpirun` is not installed.

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_lazyadam-mpi-check");

/// A hung MPI job (a rank stuck in a collective) fails the test instead of the CI run.
const TIMEOUT: Duration = Duration::from_secs(300);

/// One MPI job at a time (the machine may have two cores).
static ONE_JOB: Mutex<()> = Mutex::new(());

fn mpirun_available() -> Result<String, String> {
    match Command::new("mpirun").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
        Ok(out) => Err(format!("`mpirun --version` failed: {}", out.status)),
        Err(e) => Err(format!(
            "`mpirun` not found ({e}); install Open MPI (openmpi-bin)"
        )),
    }
}

/// Runs `cmd` (with Open MPI's run-as-root permission) to completion or the timeout.
fn run(mut cmd: Command) -> Output {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait for the killed job");
                panic!(
                    "{shown}: no exit after {TIMEOUT:?} (a rank hung in a collective?)\n\
                     stdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("{shown}: {e}"),
        }
    }
    let out = child.wait_with_output().expect("collect the job's output");
    println!("$ {shown}\n{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn assert_ok(out: &Output, ranks: usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the check failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!("collective check: OK ({ranks} rank(s)");
    assert!(stdout.contains(&want), "no `{want}` line in:\n{stdout}");
}

#[test]
fn four_ranks_under_mpirun() {
    let version = match mpirun_available() {
        Ok(v) => v,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    println!("{version}");
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", "4", "--allow-run-as-root", "--oversubscribe", CHECK]);
    assert_ok(&run(cmd), 4);
}

#[test]
fn one_rank_without_mpirun() {
    // Open MPI's singleton initialization starts its runtime daemon, which
    // comes with `mpirun`.
    if let Err(reason) = mpirun_available() {
        println!("skipped: {reason}");
        return;
    }
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    assert_ok(&run(Command::new(CHECK)), 1);
}

/// The `sharded_mf` example, which `cargo test` builds beside this test's
/// binary (`target/<profile>/examples/`).
fn example(name: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe
        .parent()?
        .parent()?
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

#[test]
fn sharded_mf_is_bit_identical_on_four_ranks() {
    if let Err(reason) = mpirun_available() {
        println!("skipped: {reason}");
        return;
    }
    let Some(exe) = example("sharded_mf") else {
        println!("skipped: the sharded_mf example is not built (cargo test builds it)");
        return;
    };
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", "4", "--allow-run-as-root", "--oversubscribe"])
        .arg(&exe)
        .args([
            "--users", "60", "--items", "25", "--dim", "4", "--steps", "40",
        ])
        .args(["--batch", "64"]);
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sharded_mf failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("bit-identity check: OK (4 rank(s)"),
        "no bit-identity line in:\n{stdout}"
    );
}
