"""`algpt2 launch`: one data-parallel run as N processes of this machine.

Each process runs the same `algpt2` command with its place in the run in
the environment (`ALGPT2_COORDINATOR=localhost:PORT`,
`ALGPT2_NUM_PROCESSES`, `ALGPT2_PROCESS_ID`: what `algpt2 train
--distribute jax-data-parallel` reads, see `distribute.py`) and
`KERAS_BACKEND=jax`. Their output lines come out prefixed with `[I]`. When
one process fails (or is killed), the others are stopped at once, since they
could only wait for it, and the launch exits with its status; rerunning the
same command resumes the run from its last checkpoint.

On several hosts, start one process per host with the same variables (the
README shows Slurm and Kubernetes recipes) instead.

Example (any `algpt2` arguments; `info` is quick):

>>> import io
>>> from algpt2_tf.training.launch import launch_local
>>> output = io.StringIO()
>>> launch_local(["info", "--preset", "algpt2-tiny"], nproc=2, out=output)
0
>>> '[1]   "preset": "algpt2-tiny",' in output.getvalue().splitlines()
True
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_GRACE_SECONDS = 5


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_environment(environ, index, nproc, port):
    """The environment of process `index` of `nproc` meeting at localhost:`port`."""
    return dict(environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1",
                ALGPT2_COORDINATOR=f"localhost:{port}", ALGPT2_NUM_PROCESSES=str(nproc),
                ALGPT2_PROCESS_ID=str(index))


def _relay(stream, prefix, out, lock):
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def _stop(processes):
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_SECONDS
    for proc in processes:
        try:
            proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_local(argv, nproc, port=None, environ=None, out=None, program=None):
    """Runs `algpt2 ARGV` as `nproc` local processes of one run; returns the exit status.

    Args:
        argv: the `algpt2` arguments, e.g. `["train", "--distribute",
            "jax-data-parallel", ...]`.
        nproc: how many processes.
        port: the coordinator's port on localhost (default: a free one).
        environ: the processes' base environment (default: this one's).
        out: where their prefixed output goes (default: stdout).
        program: what runs ARGV (default: the `algpt2` command of this
            Python; the scaling benchmark passes its own worker).

    Returns:
        0 when every process succeeded, else the first failure's status
        (a process killed by signal S gives 128 + S).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}.")
    out = out or sys.stdout
    port = port or free_port()
    environ = os.environ if environ is None else environ
    lock = threading.Lock()
    processes, relays = [], []
    failed = None  # the index of the first process that failed
    try:
        for index in range(nproc):
            proc = subprocess.Popen(
                [*(program or [sys.executable, "-m", "algpt2_command"]), *argv],
                env=worker_environment(environ, index, nproc, port), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            processes.append(proc)
            with lock:
                out.write(f"algpt2 launch: process {index} of {nproc}: pid {proc.pid}\n")
                out.flush()
            relay = threading.Thread(target=_relay, args=(proc.stdout, f"[{index}] ", out, lock),
                                     daemon=True)
            relay.start()
            relays.append(relay)
        while failed is None and any(p.poll() is None for p in processes):
            failed = next((i for i, p in enumerate(processes) if p.poll() not in (None, 0)), None)
            time.sleep(0.1)
        if failed is None:
            failed = next((i for i, p in enumerate(processes) if p.returncode), None)
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        _stop(processes)
        for relay in relays:
            relay.join(timeout=5)
    if failed is None:
        return 0
    if failed == "interrupted":
        return 128 + signal.SIGINT
    status = processes[failed].returncode
    status = 128 - status if status < 0 else status  # killed by signal S: 128 + S, as a shell says
    with lock:
        out.write(f"algpt2 launch: process {failed} failed with status {status}; stopped the "
                  "others. The same command resumes the run.\n")
        out.flush()
    return status
