"""
nanoGPT-style configuration, checked: a script's settings are plain module-level values, each with
its check as an annotation beside it; a config file or `--key=value` flags override them, and
`--help` lists them with their comments. Standard library only, so every script can import it.

    max_len: Annotated[int, Interval('[3, inf)')] = 30
    voc_interval: Annotated[int, Needs('voc_root')] = 0   # set only where --voc_root is
    device: DEVICE = 'cpu'                                # one torch can use on this machine
    if __name__ == '__main__':       # importing the script keeps the defaults and runs nothing
        configure(globals())         # python train.py config/shapes.py --batch_size=64
        main()

A bare `*.py` argument is a config file, applied as flags in order (later ones win). Unknown keys
are refused, naming the nearest known one. A value keeps its default's type (an int passes for a
float), booleans are `True`/`False`, and a `None` default takes a Python literal only (so that a
typo never becomes a string); None means unset and passes every check. Other bare arguments are
refused unless the script says what they are (caption.py's images). Errors exit with one line.
"""

import ast
import difflib
import math
import re
import sys
from typing import Annotated, Literal, get_args, get_origin

class Interval:
    """A check: the value lies in an interval written as in mathematics, e.g. '(0, 1]' or '[1,
    inf)'. An infinite value is never inside one."""

    def __init__(self, text: str):
        low, high = text[1:-1].split(',')
        self.text, self.low, self.high = text, float(low), float(high)
        self.low_open, self.high_open = text[0] == '(', text[-1] == ')'

    def problem(self, value):
        if math.isinf(value):
            return 'must be a finite number'
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        bound = f"{'>' if self.low_open else '>='} {self.low:g}"
        if not (above and below):
            return f'must be in {self.text}' if self.high < math.inf else \
                'must be positive' if bound == '> 0' else f'must be {bound}'


class CommaList:
    """A check: the value is a comma-separated list of some of `choices`, e.g. 'train,svm'."""

    def __init__(self, *choices: str):
        self.choices = choices

    def problem(self, value):
        unknown = [item for item in value.split(',') if item not in self.choices]
        return f"{unknown[0]!r} is not one of {', '.join(self.choices)} (comma-separated)" \
            if unknown else None


class Device:
    """A check: a device torch can use on this machine (torch is imported only to check it)."""

    def problem(self, value):
        import torch
        try:
            device = torch.device(value)
        except RuntimeError:
            return 'not a device name (cpu, cuda, cuda:1, ...)'
        available = {'cpu': True, 'cuda': torch.cuda.is_available(),
                     'mps': torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            return 'not available on this machine (use --device=cpu)'
        if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
            return f'this machine has {torch.cuda.device_count()} GPU(s)'


class Needs:
    """A check across keys: the value may differ from its default only where another key is set
    (Needs('voc_root')) or has a given value (Needs('pretext', 'cappa')); `why` ends the error."""

    def __init__(self, key: str, value=None, why: str = ''):
        self.key, self.value, self.why = key, value, why

    def unmet(self, config: dict):
        other = config[self.key]
        if self.value is None and not other:
            return f"needs --{self.key}{self.why}"
        if self.value is not None and other != self.value:
            return f"needs --{self.key}={self.value}, not {other}{self.why}"


# annotations for config values; int values pass too
POSITIVE = Annotated[float, Interval('(0, inf)')]
NON_NEGATIVE = Annotated[float, Interval('[0, inf)')]
FRACTION = Annotated[float, Interval('(0, 1]')]
PROBABILITY = Annotated[float, Interval('[0, 1]')]
DEVICE = Annotated[str, Device()]


def config_keys(config: dict) -> list[str]:
    """The overridable keys of a script's globals(): public names bound to plain values, not
    CONSTANTS (a folder named HERE, evaluate.py's N_FOLDS)."""
    return [k for k, v in config.items() if not k.startswith('_') and not k.isupper()
            and isinstance(v, (bool, int, float, str, type(None)))]


def problem(annotation, value):
    """What is wrong with `value` for its annotation (Literal[...] or Annotated[type, checks])."""
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


def parse_value(key: str, text: str, default):
    """`text` as a value of the default's type; ValueError saying why not."""
    if isinstance(default, bool):  # bool before int: bool is a subclass of int
        if text not in ('True', 'False'):
            raise ValueError(f"--{key} takes True or False, got {text!r}")
        return text == 'True'
    if isinstance(default, str):
        return text  # strings are taken as written, so --out_dir=123 stays the string '123'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        what = 'a number or a quoted string' if default is None else a_type(default)
        raise ValueError(f"--{key} takes {what}, got {text!r}") from None
    return check_type(key, value, default)


def a_type(value) -> str:
    """'an int', 'a float': the type of `value`, for error messages."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_type(key: str, value, default):
    """`value` converted to the default's type where that is lossless, else ValueError."""
    if default is None:
        return value
    if value is None:  # only a key whose default is None can be left unset
        raise ValueError(f"{key} takes {a_type(default)}, got None")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"{key} takes True or False, got {value!r}")
    if isinstance(default, float) and type(value) is int:
        return float(value)  # --lr=1 means 1.0 (nanoGPT refuses it)
    if type(value) is not type(default):
        raise ValueError(f"{key} takes {a_type(default)}, got {value!r} ({type(value).__name__})")
    return value


def unknown_key(key: str, known: list[str], where: str) -> ValueError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ''
    return ValueError(f"{where}: unknown config key '{key}'{hint}")


def configure(config: dict, argv: list[str] | None = None, arguments: str = '') -> list[str]:
    """Apply the config files and --key=value flags of `argv` (default: the command line) to
    `config`, a script's globals(), then run the declared checks. Other bare arguments are refused,
    unless `arguments` says what they are: then they are returned. Errors exit with one line."""
    known = config_keys(config)
    defaults = {key: config[key] for key in known}  # for the Needs checks
    rest = []
    try:
        for arg in sys.argv[1:] if argv is None else argv:
            if arg in ('-h', '--help'):
                print(help_text(config, known))
                raise SystemExit(0)
            key, eq, text = arg[2:].partition('=')
            if arg.startswith('--') and not eq:
                raise ValueError(f"flag '{arg}' needs a value: write --{key}=VALUE")
            if arg.startswith('--') and key not in known:
                raise unknown_key(key, known, 'command line')
            if arg.startswith('--'):
                config[key] = parse_value(key, text, config[key])
            elif arg.endswith('.py'):
                apply_config_file(config, arg, known)
            else:
                rest.append(arg)
        if rest and not arguments:
            raise ValueError(f"unexpected arguments {rest} (config files end in .py, flags are "
                             "--key=value)")
        annotations = config.get('__annotations__')
        if annotations is None and '__annotate__' in config:  # Python 3.14 makes them when asked
            annotations = config['__annotate__'](1)  # 1: annotationlib.Format.VALUE
        for key, annotation in (annotations or {}).items():
            if config[key] is None:  # left unset: neither its bounds nor the keys it needs apply
                continue
            if isinstance(annotation, str):  # postponed: `from __future__ import annotations`
                annotation = eval(annotation, {**globals(), **config})
            wrong = problem(annotation, config[key])
            if wrong:
                raise ValueError(f"--{key}={config[key]!r}: {wrong}")
            for check in getattr(annotation, '__metadata__', ()):
                if isinstance(check, Needs) and config[key] != defaults[key] and \
                        check.unmet(config):
                    raise ValueError(f"--{key}={config[key]!r} {check.unmet(config)}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return rest


def apply_config_file(config: dict, path: str, known: list[str]) -> None:
    values = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), {}, values)
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror}") from None
    except Exception as e:  # a config file is user code: report any failure on one line
        raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
    for key, value in values.items():
        if key.startswith('_') or type(value).__name__ == 'module':
            continue
        if key not in known:
            raise unknown_key(key, known, f"config file {path}")
        try:
            config[key] = check_type(key, value, config[key])
        except ValueError as e:
            raise ValueError(f"config file {path}: {e}") from None


def help_text(config: dict, known: list[str]) -> str:
    """--help: each key with its value and what the script's source says of it, the comment on its
    line or else the comment lines just above it (a dashed rule ends those)."""
    notes, above = {}, []
    try:
        with open(config['__file__']) as f:
            lines = f.read().splitlines()
    except (KeyError, OSError):  # no source to read: the values alone
        lines = []
    for line in lines:
        if line.lstrip().startswith('#'):
            above = [] if line.lstrip().startswith('# ---') else above + [line.lstrip('# ')]
            continue
        key = re.match(r'(\w+) *[:=]', line)  # a module-level assignment
        if key and key[1] in known and key[1] not in notes:
            notes[key[1]] = line.partition('  # ')[2] or ' '.join(above)
        above = []
    values = {key: repr(config[key]) for key in known}
    key_width = max(map(len, known), default=0)
    value_width = max(map(len, values.values()), default=0)
    return '\n'.join(f"--{key:<{key_width}} = {values[key]:<{value_width}}  {notes.get(key, '')}"
                     .rstrip() for key in known)
