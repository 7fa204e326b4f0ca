"""
The folder of a train.py run, kept safe: one run at a time (out_dir/.lock), never a run replaced by
mistake, and stop signals that save before they stop.

    from run_folder import StopSignals, claim_run_folder
    claim_run_folder(out_dir, scratch=True)          # ValueError (one line) if refused
    stop = StopSignals(out_dir, ckpt_path, master)   # from now on SIGTERM, SIGINT, SIGUSR1 ...
    signum = stop.agreed(iter_num, log_interval, device)  # ... stop the loop here, on every process
    stop.exit(signum, iter_num, trained=True)        # after the save: exit 128 + signum

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (Slurm's --signal) ask the loop to finish its iteration and
save, and the run then exits with 128 + the signal's number, as the signal itself would have, so
that schedulers see an interrupted job; a second Ctrl-C stops at once. Imports torch and
configurator.py only.
"""

import atexit
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

from configurator import write_atomically

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

RUN_FILES = ('ckpt.pt', 'best.pt', 'log.jsonl')


def claim_run_folder(out_dir: str, scratch: bool, overwrite: bool = False,
                     auto: bool = False) -> None:
    """Make out_dir ready for a train.py run: take its lock (out_dir/.lock, released when the
    process exits), clear the temporary files of saves that were killed, and for a scratch run
    refuse a folder that holds a run, unless `overwrite` (then its files go) or `auto` and it holds
    only the log of a run that died before its first save. ValueError with one line if refused; a
    stale lock taken over is said on stdout."""
    os.makedirs(out_dir, exist_ok=True)
    note = take_lock(os.path.join(out_dir, '.lock'))
    if note:
        print(f"note: {note}", flush=True)
    for name in os.listdir(out_dir):
        if any(name.startswith(f'{run_file}.tmp') for run_file in RUN_FILES):
            os.remove(os.path.join(out_dir, name))
    earlier = [os.path.join(out_dir, name) for name in RUN_FILES
               if os.path.exists(os.path.join(out_dir, name))
               and os.path.getsize(os.path.join(out_dir, name))]
    if auto and earlier == [os.path.join(out_dir, 'log.jsonl')]:
        earlier = []
    if scratch and earlier and not overwrite:
        raise ValueError(f"{out_dir} holds a run ({', '.join(map(os.path.basename, earlier))}): "
                         "resume it with --init_from=resume, write elsewhere with --out_dir, or "
                         "replace it with --overwrite=True")
    if scratch:
        for path in earlier:
            os.remove(path)


def take_lock(lock_path: str) -> str:
    """Create the lock file (pid and host) atomically and whole: written beside it, then hard-linked
    to its name, which fails if it exists. A live run's lock is refused (ValueError); a lock left by
    an ended process on this host is taken over (the returned note says so)."""
    mine, note = f"{lock_path}.{os.getpid()}", ''
    write_atomically(mine, lambda f: f.write(f"{os.getpid()} {socket.gethostname()}\n"), mode='w')
    try:
        for _ in range(2):
            try:
                os.link(mine, lock_path)
            except FileExistsError:
                with open(lock_path) as f:
                    pid, _, host = f.read().strip().partition(' ')
                if not pid.isdigit() or not host:  # not written by take_lock, which writes whole
                    raise ValueError(f"{lock_path} names no run (it is not a lock of this "
                                     f"project's): remove it if no run is using "
                                     f"{os.path.dirname(lock_path)}") from None
                if host == socket.gethostname() and not process_alive(int(pid)):
                    note = f"{lock_path} was left by pid {pid}, which has ended: taking it over"
                    os.remove(lock_path)
                    continue
                raise ValueError(f"{os.path.dirname(lock_path)} is in use by another run (pid "
                                 f"{pid} on {host}, {lock_path}); wait for it, write elsewhere "
                                 f"with --out_dir, or remove {lock_path} if no run is using "
                                 f"it") from None
            atexit.register(os.remove, lock_path)
            return note
    finally:
        os.remove(mine)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def ignore_stop_signals(worker_id):
    """A DataLoader worker's init: workers leave Ctrl-C (sent to the terminal's whole process group)
    and SIGUSR1 to the main process, which stops them after saving. SIGTERM keeps its default: it
    is how the workers are shut down."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """From its creation on, the first stop signal asks the loop to save after this iteration; a
    second Ctrl-C stops at once (even in the middle of a save, which only ever writes a temporary
    file until it is whole)."""

    def __init__(self, out_dir: str, ckpt_path: str, master: bool):
        self.out_dir, self.ckpt_path, self.master = out_dir, ckpt_path, master
        self.signum = 0  # the first signal received, 0 until one comes
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            kept = f"{self.ckpt_path} holds the last checkpoint" \
                if os.path.exists(self.ckpt_path) else "no checkpoint was written"
            print(f"\nerror: interrupted again: stopped at once; {kept}", file=sys.stderr,
                  flush=True)
            if self.master:  # what atexit and write_atomically would have removed
                for name in os.listdir(self.out_dir):
                    if name == '.lock' or name.endswith(f'.tmp{os.getpid()}'):
                        os.remove(os.path.join(self.out_dir, name))
            os._exit(1)  # not an exception: raised inside torch.save it would become a traceback
        self.signum = self.signum or signum
        if self.master:
            print(f"\n{signal.Signals(signum).name}: stopping after this iteration, saving "
                  f"{self.ckpt_path}", flush=True)

    def agreed(self, it: int, every: int, device) -> int:
        """The signal to stop on at iteration `it`, the same on every process: under DDP they
        compare notes every `every` iterations, with one tiny all-reduce where the loop waits for
        the device anyway."""
        if not dist.is_initialized():
            return self.signum
        if it % every:
            return 0
        flag = torch.tensor(self.signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item()

    def exit(self, signum: int, it: int, trained: bool):
        """End the run stopped by `signum` (agreed()'s) as the signal would have: exit status 128 +
        its number."""
        if self.master:
            saved = f"{self.ckpt_path} holds iteration {it}: continue with --init_from=resume" \
                if trained else "nothing was trained yet"
            print(f"stopped by {signal.Signals(signum).name} at iteration {it}; {saved}",
                  flush=True)
        raise SystemExit(128 + signum)
