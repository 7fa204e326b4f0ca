"""
Override a script's plain config values from the command line, nanoGPT-style, but validated.

    python train.py config/shapes.py --batch_size=64 --compile=False

A script declares its config as module-level values and calls, right after them,

    from configurator import configure
    args = configure(globals())          # returns the bare arguments that are not config files

A bare `*.py` argument is a config file: it is executed and its assignments are applied as if
they were flags, in order, so later flags win. `--key=value` sets one value. Every key must
already exist in the script (unknown keys are refused, naming the nearest known one), and the
value must have the default's type: an int is accepted where a float is expected, booleans are
`True`/`False` only, a `None` default takes a Python literal only (a number, or a string in quotes:
a bare word is refused, so that a typo never becomes a string). Any other bare argument is returned
for the script (e.g. caption.py's image paths). `--help` lists the keys with their values. Errors
exit with a one-line message naming the key or file.

`one_line_errors()` is the other half of the project's error policy: library code raises ordinary
exceptions (ValueError, OSError) whose message names the file; a script wraps its loading steps in
it, and such an exception ends the script with one line `error: <message>`, not a traceback.
Standard library only, so every script can import it.
"""

import ast
import difflib
import sys
from contextlib import contextmanager

CONFIG_TYPES = (bool, int, float, str, type(None))


def config_keys(config: dict) -> list[str]:
    """The overridable keys of a script's globals(): public names bound to plain values."""
    return [k for k, v in config.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


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
        raise ValueError(f"--{key} takes a {type(default).__name__}, got {text!r}") from None
    return check_type(key, value, default)


def check_type(key: str, value, default):
    """Return `value` converted to the default's type where that is lossless, else raise."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} takes True or False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --lr=1 means 1.0 (nanoGPT refuses it)
    if type(value) is not type(default):
        raise ValueError(f"{key} takes a {type(default).__name__}, got {value!r} ({type(value).__name__})")
    return value


def unknown_key_message(key: str, known: list[str], where: str) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ''
    return f"{where}: unknown config key '{key}'{hint}"


def configure(config: dict, argv: list[str] | None = None) -> list[str]:
    """Apply config files and --key=value flags in `argv` to `config` (a script's globals()).

    Returns the bare arguments that are not config files. Exits with a one-line message on error.
    """
    argv = sys.argv[1:] if argv is None else argv
    known = config_keys(config)
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


@contextmanager
def one_line_errors():
    """Turn the ValueError / OSError of a library call into the script's one-line `error: ...` exit."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
