"""
The scripts' contract with their user: nanoGPT-style config overrides, validated; one-line errors;
files written whole or not at all. Standard library only, so every script can import it.

    python train.py config/shapes.py --batch_size=64 --compile=False

A script declares its config as module-level values, each check next to its value as an annotation
(standard typing, so linters and type checkers read them too), and calls, right after them,

    from configurator import FRACTION, POSITIVE, configure
    batch_size: POSITIVE = 256                         # > 0
    train_fraction: FRACTION = 1.0                     # in (0, 1]
    dtype: Literal['float32', 'bfloat16'] = 'float32'  # one of these
    max_len: Annotated[int, Interval('[3, inf)')] = 30
    voc_interval: Annotated[int, Needs('voc_root')] = 0  # set only where --voc_root is
    args = configure(globals())              # returns the bare arguments that are not config files

A bare `*.py` argument is a config file: it is executed and its assignments are applied as if they
were flags, in order, so later flags win. `--key=value` sets one value. Every key must already exist
in the script (unknown keys are refused, naming the nearest known one), and the value must have the
default's type: an int is accepted where a float is expected, booleans are `True`/`False` only, a
`None` default takes a Python literal only (a number, or a string in quotes: a bare word is refused,
so that a typo never becomes a string; only such a key can be set to None). Then every annotated
check runs on the final values (None means unset and passes); a Needs check refuses a value changed
from its default where the key it needs is unset or has another value. Any other bare argument is
returned for the script (e.g. caption.py's image paths). `--help` lists the keys with their values.
Errors exit with a one-line message naming the key or file.

`check_device()`, `native_bf16()` and `precision()` check --device and resolve --dtype; they import
torch when called, so that this file stays importable without it.
`one_line_errors()` is the other half of the error policy: library code raises ordinary exceptions
(ValueError, OSError) whose message names the file; a script wraps its loading steps in it, and such
an exception ends the script with one line `error: <message>`, not a traceback. `write_atomically()`
is how every file the project writes is written: to a temporary file, then renamed over the target,
so a crash or a full disk leaves the previous file intact and never half a file; `JsonLog` appends
whole lines.
"""

import ast
import difflib
import errno
import json
import math
import os
import sys
from contextlib import contextmanager
from typing import Annotated, Literal, get_args, get_origin

CONFIG_TYPES = (bool, int, float, str, type(None))


class Interval:
    """A check: the value lies in an interval written as in mathematics, e.g. '(0, 1]' or '[1,
    inf)'."""

    def __init__(self, text: str):
        low, high = text[1:-1].split(',')
        self.text, self.low, self.high = text, float(low), float(high)
        self.low_open, self.high_open = text[0] == '(', text[-1] == ')'

    def problem(self, value):
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if above and below:
            return None
        if self.high == math.inf:
            return 'must be positive' if self.low == 0 and self.low_open else \
                f'must be >= {self.low:g}'
        return f'must be in {self.text}'


class CommaList:
    """A check: the value is a comma-separated list of some of `choices`, e.g. 'train,svm'."""

    def __init__(self, *choices: str):
        self.choices = choices

    def problem(self, value):
        unknown = [item for item in value.split(',') if item not in self.choices]
        if unknown:
            return f"{unknown[0]!r} is not one of {', '.join(self.choices)} (comma-separated)"
        return None


class Needs:
    """A check across keys: the value may differ from its default only where another key is set
    (Needs('voc_root')) or has a given value (Needs('pretext', 'cappa')); `why` ends the error."""

    def __init__(self, key: str, value=None, why: str = ''):
        self.key, self.value, self.why = key, value, why

    def unmet(self, config: dict):
        other = config[self.key]
        if self.value is None:
            return None if other else f"needs --{self.key}{self.why}"
        return None if other == self.value else \
            f"needs --{self.key}={self.value}, not {other}{self.why}"


# annotations for config values; int values pass too
POSITIVE = Annotated[float, Interval('(0, inf)')]
NON_NEGATIVE = Annotated[float, Interval('[0, inf)')]
FRACTION = Annotated[float, Interval('(0, 1]')]
PROBABILITY = Annotated[float, Interval('[0, 1]')]


def config_keys(config: dict) -> list[str]:
    """The overridable keys of a script's globals(): public names bound to plain values, not
    CONSTANTS (a folder named HERE, evaluate.py's N_FOLDS)."""
    return [k for k, v in config.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, CONFIG_TYPES)]


def problem(annotation, value):
    """What is wrong with `value` for its annotation (Literal[...] or Annotated[type, Interval]), or
    None."""
    if get_origin(annotation) is Literal and value not in get_args(annotation):
        return f"choose one of {', '.join(map(str, get_args(annotation)))}"
    if get_origin(annotation) is Annotated:
        kind = get_args(annotation)[0]
        # a None default takes any literal: 'abc' or True where a number belongs is refused here
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or kind is int and not isinstance(value, int)):
            return f"takes {'an integer' if kind is int else 'a number'}, got {value!r}"
        checks = [check for check in annotation.__metadata__ if not isinstance(check, Needs)]
        return next(filter(None, (check.problem(value) for check in checks)), None)
    return None


def declared_annotations(config: dict) -> dict:
    """The annotations of a script's globals()."""
    annotations = config.get('__annotations__')
    if annotations is None and '__annotate__' in config:  # Python 3.14 evaluates them when asked
        annotations = config['__annotate__'](1)  # 1: annotationlib.Format.VALUE
    return annotations or {}


def parse_value(key: str, text: str, default):
    """Parse `text` for `key` so it has the type of `default`; raise ValueError saying why not."""
    if isinstance(default, bool):  # bool before int: bool is a subclass of int
        if text not in ('True', 'False'):
            raise ValueError(f"--{key} takes True or False, got {text!r}")
        return text == 'True'
    if isinstance(default, str):
        return text  # strings are taken as written, so --out_dir=123 stays the string '123'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            raise ValueError(f"--{key} takes a number or a quoted string, got {text!r}") from None
        raise ValueError(f"--{key} takes {a_type(default)}, got {text!r}") from None
    return check_type(key, value, default)


def a_type(value) -> str:
    """'an int', 'a float': the type of `value`, for error messages."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_type(key: str, value, default):
    """Return `value` converted to the default's type where that is lossless, else raise."""
    if default is None:
        return value
    if value is None:  # only a key whose default is None can be left unset
        raise ValueError(f"{key} takes {a_type(default)}, got None")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} takes True or False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --lr=1 means 1.0 (nanoGPT refuses it)
    if type(value) is not type(default):
        raise ValueError(f"{key} takes {a_type(default)}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def unknown_key_message(key: str, known: list[str], where: str) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ''
    return f"{where}: unknown config key '{key}'{hint}"


def configure(config: dict, argv: list[str] | None = None) -> list[str]:
    """Apply config files and --key=value flags in `argv` to `config` (a script's globals()), then
    run the declared checks. Returns the bare arguments that are not config files. Exits with one
    line on error."""
    argv = sys.argv[1:] if argv is None else argv
    known = config_keys(config)
    defaults = {key: config[key] for key in known}  # for the Needs checks
    rest = []
    for arg in argv:
        if arg in ('-h', '--help'):
            width = max(map(len, known), default=0)
            print('\n'.join(f"--{k:<{width}} = {config[k]!r}" for k in known))
            raise SystemExit(0)
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"error: flag '{arg}' needs a value: write --{key}=VALUE")
            if key not in known:
                raise SystemExit('error: ' + unknown_key_message(key, known, 'command line'))
            try:
                config[key] = parse_value(key, text, config[key])
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        elif arg.endswith('.py'):
            apply_config_file(config, arg, known)
        else:
            rest.append(arg)
    for key, annotation in declared_annotations(config).items():
        if config[key] is None:  # left unset: neither its bounds nor the keys it needs apply
            continue
        wrong = problem(annotation, config[key])
        if wrong:
            raise SystemExit(f"error: --{key}={config[key]!r}: {wrong}")
        for check in getattr(annotation, '__metadata__', ()):
            unmet = isinstance(check, Needs) and config[key] != defaults[key] and \
                check.unmet(config)
            if unmet:
                raise SystemExit(f"error: --{key}={config[key]!r} {unmet}")
    return rest


def apply_config_file(config: dict, path: str, known: list[str]) -> None:
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise SystemExit(f"error: config file {path}: {e.strerror}") from None
    values = {}
    try:
        exec(compile(source, path, 'exec'), {}, values)
    except Exception as e:  # a config file is user code: report any failure on one line
        raise SystemExit(f"error: config file {path}: {type(e).__name__}: {e}") from None
    for key, value in values.items():
        if key.startswith('_') or type(value).__name__ == 'module':
            continue
        if key not in known:
            raise SystemExit('error: ' + unknown_key_message(key, known, f"config file {path}"))
        try:
            config[key] = check_type(key, value, config[key])
        except ValueError as e:
            raise SystemExit(f"error: config file {path}: {e}") from None


def check_outputs(outputs: dict, inputs: dict) -> None:
    """ValueError if a file a script is about to write is one of the files it reads, by any name
    (a link, a relative path), or if two outputs are one file: writing would destroy an input.
    outputs map a flag's name to a path or a list of paths; inputs map what names a file ('--ckpt',
    'an image to caption') to a path or a list of paths. Empty paths are skipped."""
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
    for flag, path in named_paths(outputs):
        key = identity(path)
        if key in taken:
            name, other = taken[key]
            raise ValueError(f"--{flag}={path} is also {name} ({other}): writing it would destroy "
                             "that file; choose another path")
        taken[key] = (f'--{flag}', path)


@contextmanager
def one_line_errors():
    """Turn the ValueError / OSError of a library call into the script's one-line `error: ...`
    exit."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def write_atomically(path: str, write, mode: str = 'wb') -> None:
    """write(file) into a temporary file beside `path`, then rename it over `path`: the file is
    whole or absent, and a crash, a signal or a full disk leaves the previous one as it was. On
    failure the temporary file is removed and an OSError names the file and the cause (e.g. No space
    left on device)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename makes it the file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer reports a failed write as a RuntimeError
        cause = e if isinstance(e, OSError) else e.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else \
            str(e).splitlines()[0]
        raise OSError(f"{path}: cannot write ({reason})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)



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
# --device and --dtype: where and in what precision a script runs (torch is imported when called)

def check_device(device: str) -> None:
    """ValueError with one line if `device` is not one torch can use here (e.g. cuda on a machine
    without it)."""
    import torch
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device={device}: not a device name (cpu, cuda, cuda:1, ...)") from None
    available = {'cpu': True, 'cuda': torch.cuda.is_available(),
                 'mps': torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise ValueError(f"--device={device}: not available on this machine (use --device=cpu)")
    index = torch.device(device).index
    if kind == 'cuda' and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device={device}: this machine has {torch.cuda.device_count()} GPU(s)")


def native_bf16(device) -> bool:
    """True where the hardware multiplies bfloat16 natively: CUDA GPUs that support it, and CPUs
    with AVX512-BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later).
    Elsewhere oneDNN emulates bf16, slower than float32, so 'auto' precisions (train.py's dtype,
    evaluate.py's svm_dtype) pick float32 there."""
    import torch
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:  # a private call, but the only one that names the CPU's bf16 instructions
        capability = torch._C._cpu._get_cpu_capability()
    except AttributeError:
        return False
    return bool(capability.get('avx512_bf16') or capability.get('amx_bf16'))


def precision(device: str, dtype: str, deterministic: bool = False):
    """The precision a script trains in, with torch's backends set to match. dtype 'auto' is
    bfloat16 where the hardware multiplies it natively, else float16 on GPUs (which then needs a
    gradient scaler) and float32 on CPUs. On GPUs TF32 and cuDNN's autotuning are on, which makes a
    resumed run close to an unbroken one, not bitwise, unless `deterministic` (deterministic kernels
    throughout). Returns (dtype, its autocast context, a warning to print or '')."""
    import contextlib
    import torch
    kind = torch.device(device).type
    if dtype == 'auto':
        dtype = 'bfloat16' if native_bf16(device) else 'float16' if kind == 'cuda' else 'float32'
    if kind == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS's deterministic GEMMs
        torch.use_deterministic_algorithms(True)
    warning = ''
    if kind == 'cpu' and (dtype == 'float16' or dtype == 'bfloat16' and not native_bf16(device)):
        warning = (f"warning: --dtype={dtype} is emulated on this CPU, slower than float32 "
                   "(float16 ~25x on the development machine); use float32, or bfloat16 where the "
                   "CPU has it")
    autocast = contextlib.nullcontext() if dtype == 'float32' else \
        torch.autocast(kind, dtype=getattr(torch, dtype))
    return dtype, autocast, warning
