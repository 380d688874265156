"""
Config overrides, nanoGPT style. A training script keeps its config as plain module-level globals, then:

    from configurator import apply_overrides, config_snapshot
    apply_overrides(globals(), sys.argv[1:])
    config = config_snapshot(globals())  # right away, before the script defines other globals

Each argument is either a python file (e.g. config/stage1_vitg_opt.py) whose assignments override the defaults,
or --key=value. Values go through ast.literal_eval (so --lr=3e-4 is a float, --betas=(0.9,0.95) a tuple) and fall
back to the raw string (--out_dir=out/stage1). A value must have the type of the default it replaces.
"""
import ast
import difflib

PLAIN_TYPES = (int, float, bool, str, type(None), list, tuple, dict)


def _config_keys(config):
    """The names that count as config: public globals holding plain values (not modules, functions, classes)."""
    return [k for k, v in config.items() if not k.startswith('_') and isinstance(v, PLAIN_TYPES)]


def _set(config, key, value, source):
    """Type-check value against the default for key and store it."""
    keys = _config_keys(config)
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{source}: unknown config key {key!r}{hint}")
    default = config[key]
    if isinstance(default, float) and type(value) is int:
        value = float(value)  # --lr=1 means 1.0
    # type() rather than isinstance: True must not pass for an int key, nor 1 for a bool key
    if default is not None and type(value) is not type(default):
        raise ValueError(f"{source}: config key {key!r} expects {type(default).__name__}, "
                         f"got {type(value).__name__} {value!r}")
    config[key] = value


def apply_overrides(config, argv):
    """Apply config files and --key=value args, in order, to the dict config (a script's globals()); returns it."""
    for arg in argv:
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise ValueError(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string such as --device=cuda
            _set(config, key, value, arg)
        elif arg.endswith('.py'):
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), namespace)
            for key in _config_keys(namespace):
                _set(config, key, namespace[key], arg)
        else:
            raise ValueError(f"{arg}: expected a config file (*.py) or --key=value")
    return config


def config_snapshot(config):
    """The config values of config (a script's globals()) as a plain dict, for logs and checkpoints."""
    return {k: config[k] for k in _config_keys(config)}


def override_args(settings):
    """The --key=value arguments that apply_overrides reads back as `settings` (a dict of plain values): how one
    script passes settings to another on its command line."""
    args = []
    for key, value in settings.items():
        text = repr(value)
        if isinstance(value, str):
            try:
                ast.literal_eval(value)
            except (ValueError, SyntaxError):
                text = value  # reads back as itself, as a path typed by hand does
        args.append(f"--{key}={text}")
    return args
