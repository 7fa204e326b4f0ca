"""
Nothing a user has is lost: no script writes over a file it reads, every file is written whole or
not at all, the log never holds a cut line, and errors are one line. For train.py also its run
folder: one run at a time (out_dir/.lock), never a run replaced by mistake, stop signals that save
before they stop, and checkpoints that are never diverged and that resume exactly.

    from safety import check_outputs, one_line_errors, write_atomically
    with one_line_errors():                           # ValueError / OSError -> 'error: ...', exit 1
        check_outputs({'out': out}, {'--ckpt': ckpt}) # before any work: outputs are not inputs
        write_atomically(out, lambda f: f.write(data))

    claim_run_folder(out_dir, scratch=True)           # train.py, once every input is checked
    stop = StopSignals(out_dir, ckpt_path, master)    # SIGTERM, SIGINT, SIGUSR1 from now on ...
    signum = stop.agreed(iter_num, log_interval, device)  # ... stop the loop, on every process
    save_checkpoint(ckpt_path, model, state, optimizer, scaler, diverged)
    stop.exit(signum, iter_num, trained=True)         # after the save: exit 128 + signum

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (Slurm's --signal) ask the loop to finish its iteration and
save, and the run then exits with 128 + the signal's number, as the signal itself would have, so
that schedulers see an interrupted job; a second Ctrl-C stops at once. Weight files are untrusted
input: they are read with torch.load(weights_only=True).
"""

import atexit
import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.distributed as dist


@contextmanager
def one_line_errors():
    """Turn the ValueError / OSError of a library call, whose message names the file, into the
    script's one-line `error: ...` exit."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------------------------
# files: outputs never onto inputs, written whole, the log in whole lines

def check_outputs(outputs: dict, inputs: dict) -> None:
    """ValueError if a file a script is about to write is one of the files it reads, by any name
    (a link, a relative path), or an existing file inside a folder it reads (a data set's label
    file, an image), or if two outputs are one file: writing would destroy an input. outputs map a
    flag's name to a path or a list of paths; inputs map what names a file or folder ('--ckpt', 'an
    image to caption', '--voc_root') to a path or a list of paths. Empty paths are skipped."""
    def named_paths(named):
        for name, value in named.items():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path:
                    yield name, path

    def identity(path):  # one file, whatever its name: its inode, or where a new file would go
        try:
            status = os.stat(path)
            return status.st_dev, status.st_ino
        except OSError:
            return os.path.realpath(path)

    taken = {identity(path): (name, path) for name, path in named_paths(inputs)}
    folders = [(name, os.path.realpath(path) + os.sep) for name, path in named_paths(inputs)
               if os.path.isdir(path)]
    for flag, path in named_paths(outputs):
        key = identity(path)
        inside = [(name, folder) for name, folder in folders
                  if os.path.isfile(path) and os.path.realpath(path).startswith(folder)]
        if key in taken:
            name, other = taken[key]
            raise ValueError(f"--{flag}={path} is also {name} ({other}): writing it would destroy "
                             "that file; choose another path")
        if inside:
            raise ValueError(f"--{flag}={path} is a file of {inside[0][0]} ({inside[0][1][:-1]}): "
                             "writing it would destroy that file; choose another path")
        taken[key] = (f'--{flag}', path)


def write_atomically(path: str, write, mode: str = 'wb', keep: str = '') -> None:
    """write(file) into a temporary file beside `path`, then rename it over `path`: the file is
    whole or absent, and a crash, a signal or a full disk leaves the previous one as it was. With
    `keep`, the previous one stays under that name (a hard link: no copy). On failure the temporary
    file is removed and an OSError names the file and the cause (e.g. No space left on device)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename makes it the file
        if keep and os.path.exists(path):
            os.link(path, f"{keep}.tmp{os.getpid()}")
            os.replace(f"{keep}.tmp{os.getpid()}", keep)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer reports a failed write as a RuntimeError
        cause = e if isinstance(e, OSError) else e.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else \
            str(e).splitlines()[0]
        raise OSError(f"{path}: cannot write ({reason})") from None
    finally:
        for leftover in (tmp, f"{keep}.tmp{os.getpid()}" if keep else ''):
            if leftover and os.path.exists(leftover):
                os.remove(leftover)


class JsonLog:
    """A log of one JSON record per line (train.py's log.jsonl), appended with one write() per
    record. A record that does not fit (a full disk) leaves no cut line behind, and a line cut by an
    earlier crash is ended before the first new record, so every line a reader meets is whole."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, 'rb') as f:
                f.seek(size - 1)
                if f.read(1) != b'\n':
                    self.write(b'\n')

    def append(self, record: dict) -> None:
        self.write((json.dumps(record) + '\n').encode())

    def write(self, data: bytes) -> None:
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # only part of it fit
        except OSError as e:
            os.ftruncate(self.fd, size)
            raise OSError(f"{self.path}: cannot write ({e.strerror})") from None


# ----------------------------------------------------------------------------------------------
# train.py's run folder: one run at a time, never a run replaced by mistake

RUN_FILES = ('ckpt.pt', 'ckpt_previous.pt', 'best.pt', 'log.jsonl')
REPLACED = '.replaced'  # a run that --overwrite=True replaces, kept until the new one's first save


def claim_run_folder(out_dir: str, scratch: bool, overwrite: bool = False,
                     auto: bool = False) -> None:
    """Make out_dir ready for a train.py run: take its lock (out_dir/.lock, released when the
    process exits), clear the temporary files of saves that were killed, and for a scratch run
    refuse a folder that holds a run, unless `overwrite` or `auto` and it holds only the log of a
    run that died before its first save. An overwritten run is moved into out_dir/.replaced and
    deleted only once this run has saved its first checkpoint; until then any exit brings it back
    (a killed process's, the next run that claims the folder). ValueError with one line if
    refused; a stale lock taken over is said on stdout."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir={out_dir} is a file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    note = take_lock(os.path.join(out_dir, '.lock'))
    if note:
        print(f"note: {note}", flush=True)
    bring_back(out_dir)
    for name in os.listdir(out_dir):
        if any(name.startswith(f'{run_file}.tmp') for run_file in RUN_FILES):
            os.remove(os.path.join(out_dir, name))
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))
               and os.path.getsize(os.path.join(out_dir, name))]
    if auto and earlier == ['log.jsonl']:
        earlier = []
    if scratch and earlier and not overwrite:
        what, advice = f"a run ({', '.join(earlier)})", "resume it with --init_from=resume"
        if 'ckpt.pt' not in earlier:  # nothing to resume from
            what = f"{', '.join(earlier)} of a run that saved no checkpoint"
            advice = "go on in it with --init_from=auto" if earlier == ['log.jsonl'] else ''
        raise ValueError(f"{out_dir} holds {what}: {advice + ', ' if advice else ''}write "
                         "elsewhere with --out_dir, or replace it with --overwrite=True")
    if scratch and earlier:
        os.makedirs(os.path.join(out_dir, REPLACED))
        for name in earlier:
            os.rename(os.path.join(out_dir, name), os.path.join(out_dir, REPLACED, name))
        atexit.register(bring_back, out_dir)


def run_checkpoint(ckpt_path: str) -> str:
    """The checkpoint a resume reads: out_dir/ckpt.pt, or the one an --overwrite=True run set aside
    and was stopped before replacing (claim_run_folder brings it back); '' if neither exists."""
    for path in (ckpt_path, os.path.join(os.path.dirname(ckpt_path), REPLACED,
                                         os.path.basename(ckpt_path))):
        if os.path.exists(path):
            return path
    return ''


def bring_back(out_dir: str) -> None:
    """The run that an --overwrite=True run replaced, back in out_dir if that run never saved a
    checkpoint; what the new run wrote (its log) goes. Nothing to do once it has saved."""
    replaced = os.path.join(out_dir, REPLACED)
    if not os.path.isdir(replaced):
        return
    for name in RUN_FILES:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in os.listdir(replaced):
        os.replace(os.path.join(replaced, name), os.path.join(out_dir, name))
    os.rmdir(replaced)


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
            atexit.register(remove_quietly, lock_path)
            return note
    finally:
        os.remove(mine)


def remove_quietly(path: str) -> None:
    """At exit: a lock that cannot be removed (the folder made read-only) is left, without a
    second error line; the next run takes it over, its process having ended."""
    try:
        os.remove(path)
    except OSError:
        pass


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


# ----------------------------------------------------------------------------------------------
# stop signals: save, then stop, every process at the same iteration

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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


# ----------------------------------------------------------------------------------------------
# weight files, read as untrusted input; train.py's checkpoints, saved whole and resumed exactly

def load_file(path: str):
    """torch.load(path, weights_only=True), with one-line reasons for the files it refuses."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as e:
        found = re.search(r'unsupported (?:global: )?GLOBAL (\S+)', str(e), re.IGNORECASE)
        if found:
            raise ValueError(f"checkpoint {path}: holds Python objects ({found.group(1)}), not "
                             f"only tensors; refused because loading it could run code") from None
        raise ValueError(f"checkpoint {path}: cannot be read (not a torch checkpoint)") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: cannot be read ({reason[:200]})") from None


def previous_of(ckpt_path: str) -> str:
    """Where the checkpoint before the newest is kept: out/ckpt.pt -> out/ckpt_previous.pt."""
    root, ext = os.path.splitext(ckpt_path)
    return f"{root}_previous{ext}"


def kept_checkpoints(ckpt_path: str) -> str:
    """What a run that stops on an error leaves behind, said truly: the newest checkpoint's
    iteration, and the one kept before it (weights can grow wild for a while before the loss is
    non-finite, so the newest may be bad already)."""
    kept = []
    for path in (ckpt_path, previous_of(ckpt_path)):
        try:
            iteration = torch.load(path, map_location='cpu', weights_only=True,
                                   mmap=True)['iter_num']
            kept.append(f"{path} holds iteration {iteration}")
        except Exception:  # absent, or not readable: not kept
            continue
    return ' and '.join(kept) or "no checkpoint was written"


def read_checkpoint(path: str) -> dict:
    """A checkpoint of this project's train.py, read safely: {'model', 'model_args', 'config',
    ...}; ValueError naming the file if it is not one."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or \
            not isinstance(ckpt.get('model_args'), dict):
        raise ValueError(f"checkpoint {path}: not a checkpoint of this project (expected "
                         f"'model' and 'model_args'; official VirTex files load with "
                         f"checkpoints.load_official)")
    return ckpt


def save_checkpoint(path: str, model, state: dict, optimizer=None, scaler=None,
                    diverged=None) -> None:
    """A train.py checkpoint, written whole or not at all: the model's weights and `state` (its
    model_args, config, iteration, ...); with the optimizer, all a resume needs besides: the
    optimizer's and the gradient scaler's state and every process's RNG states, so that each one
    resumes its own dropout stream. Under torchrun every process calls it and rank 0 writes. A
    diverged run (non-finite weights, or `diverged`, a bool tensor: the loss was) never replaces a
    good checkpoint: ValueError, saying what is kept. OSError naming the file if it cannot be
    written. A full save keeps the checkpoint it replaces beside it (previous_of)."""
    full, on_cuda = optimizer is not None, next(model.parameters()).is_cuda
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if full:
        weight_norm = torch.stack([p.detach().float().norm() for p in model.parameters()]).sum()
        bad = ~torch.isfinite(weight_norm) | (False if diverged is None else diverged)
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise ValueError(f"the loss or the weights became non-finite before iteration "
                             f"{state['iter_num']}; {kept_checkpoints(path)}")
    rng_states = [torch.get_rng_state()]
    cuda_rng_states = [torch.cuda.get_rng_state()] if on_cuda else []
    if full and world_size > 1:
        rng_states, cuda_rng_states = [None] * world_size, [None] * world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())
        if on_cuda:
            dist.all_gather_object(cuda_rng_states, torch.cuda.get_rng_state())
    if rank:
        return
    checkpoint = {'model': model.state_dict(), **state}
    if full:
        checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                          world_size=world_size, rng_state=rng_states,
                          cuda_rng_state=cuda_rng_states)
    try:  # a run's checkpoints keep the one before, in case the newest went bad
        write_atomically(path, lambda f: torch.save(checkpoint, f),
                         keep=previous_of(path) if full else '')
    except OSError as e:
        raise OSError(f"{e}; the previous file stays as it was") from None
    if full:  # the run this one replaced (--overwrite=True) is gone only now
        shutil.rmtree(os.path.join(os.path.dirname(path), REPLACED), ignore_errors=True)


def resume_run(path: str, model, optimizer, scaler, model_args: dict, config: dict,
               tokenizer_pieces: str, train_subset,
               voc_task=None) -> tuple[int, tuple, dict, int, float, str, list]:
    """Continue the run of this config (train.py's, resolved) from the checkpoint at `path`: its
    weights into `model` (built from model_args), its optimizer's and gradient scaler's state (the
    learning rates, momentum and weight decay stay this run's), this process's RNGs. Returns
    (iter_num, data position, best VOC, images skipped so far, seconds trained so far, the weights
    the run started from, notes to print). A checkpoint that cannot continue this run is a
    ValueError (FileNotFoundError) naming the file and what stands in the way: so is a best.pt
    judged on another VOC task than `voc_task` (evaluate.read_voc_task's summary). With other
    processes or micro-batches the epoch goes on from the image it reached, split anew, and the
    RNGs stay as this run seeded
    them: close to an unbroken run, not bitwise."""
    if not run_checkpoint(path):
        raise FileNotFoundError(f"--init_from=resume: {path} does not exist")
    path = run_checkpoint(path)
    ckpt = read_checkpoint(path)
    try:
        saved = asdict(type(model.config)(**ckpt['model_args']))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: its model_args do not describe a VirTex model "
                         f"({e})") from None
    changed = [f"{k}={saved[k]!r} in the checkpoint, {v!r} now" for k, v in model_args.items()
               if saved[k] != v]
    if changed:
        raise ValueError(f"{path}: the model differs from the config: {'; '.join(changed)}")
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: does not fit this architecture "
                         f"({' '.join(str(e).split())[:300]})") from None
    missing = [k for k in ('optimizer', 'iter_num', 'data_position', 'rng_state', 'world_size')
               if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: cannot resume from it: no {', '.join(missing)} (a model-only "
                         "file?)")
    if ckpt['tokenizer_pieces'] != tokenizer_pieces:
        raise ValueError(f"{path}: was trained with another tokenizer than {config['tokenizer']} "
                         "(its pieces differ, so the ids would mean other words)")
    if ckpt['train_subset'] != train_subset:  # --train_fraction or --seed changed: other images
        raise ValueError(f"{path}: was trained on other images (--train_fraction="
                         f"{ckpt['config']['train_fraction']}, --seed={ckpt['config']['seed']})")
    # the seed drives the data order, the augmentation and dropout; the optimizer's state and the
    # labels must be the ones the run began with ('': a checkpoint from before the key existed)
    for key in ('seed', 'optimizer', 'label_categories'):
        if ckpt['config'].get(key, '') != config[key]:
            raise ValueError(f"{path}: was trained with --{key}={ckpt['config'].get(key, '')}, "
                             f"not {config[key]}: a resume continues the same run")
    if ckpt['iter_num'] >= config['max_iters']:
        raise ValueError(f"{path}: is at iteration {ckpt['iter_num']} already; give --max_iters "
                         "above it to train on (the learning-rate schedule follows max_iters)")
    settings = [{k: v for k, v in group.items() if k != 'params'}
                for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: its optimizer state does not fit this run "
                         f"({type(e).__name__}: {e})") from None
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    scaler.load_state_dict(ckpt['scaler'])
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    notes, best = [], ckpt['best_voc']
    judged_on = best.get('task') or voc_task  # older checkpoints do not say
    if voc_task and best['map'] < 0:  # nothing judged yet
        best = {**best, 'task': voc_task}
    if voc_task and best['map'] >= 0 and judged_on != voc_task:
        best_path = os.path.join(os.path.dirname(path), 'best.pt')
        if os.path.exists(best_path):
            raise ValueError(f"{best_path}: was judged on the VOC task of {judged_on['root']}, not "
                             f"on --voc_root={voc_task['root']} (other classes or images): resume "
                             "with that --voc_root, or move best.pt away to judge anew")
        notes.append(f"the best backbone is judged anew on {voc_task['root']}")
        best = {'map': -1.0, 'iter': 0, 'task': voc_task}
    # the place in the epoch, in micro-batches of one process: (processes, images a micro-batch)
    def split(cfg, processes):
        accumulation = cfg.get('gradient_accumulation_steps', 1)
        return processes, cfg['batch_size'] // (processes * accumulation)
    epoch, batch = ckpt['data_position']
    before, now = split(ckpt['config'], ckpt['world_size']), split(config, world_size)
    if before == now:
        torch.set_rng_state(ckpt['rng_state'][rank])
        if ckpt['cuda_rng_state'] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt['cuda_rng_state'][rank])
    else:  # the same images, split anew
        batch = batch * before[0] * before[1] // (now[0] * now[1])
        notes.append(f"{path} was written by {before[0]} process(es) of {before[1]} images a "
                     f"micro-batch, this run has {now[0]} of {now[1]}: the epoch goes on from the "
                     "image it reached, split anew, and the data order and dropout differ from an "
                     "unbroken run")
    return (ckpt['iter_num'], (epoch, batch), best, ckpt['bad_images'], ckpt.get('time', 0.0),
            ckpt.get('started_from', ''), notes)
