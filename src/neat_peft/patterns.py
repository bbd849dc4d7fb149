"""Regexes from configs and adapter files, compiled with a guard against catastrophic backtracking.

peft reads some config fields as regexes: `target_modules` / `exclude_modules` given as a string (full match),
each `modules_to_save` entry (inside `(^|.*\\.)<entry>($|\\..*)`) and each `layers_pattern` (inside
`(?:^|.*?\\.)<pattern>\\.(\\d+)\\.`). Python's `re` backtracks, so a pattern such as `(.|.)*z` takes time
exponential in the length of a module name, and one from a hostile adapter file would hang the load.

The guard parses each pattern (with `re`'s own parser) and refuses, before anything is matched:
- a repeat (`*`, `+`, `{m,n}` with n > 1) inside another repeat, e.g. `(a+)+`: exponential;
- an alternation inside a repeat, e.g. `(.|.)*` or `(ab|a)*`: exponential (a choice of single characters,
  `(q|v)*`, is a character class to `re` and allowed);
- backreferences and conditionals, e.g. `(a)\\1`: matching them is NP-hard in general;
- more than MAX_REPEATS repeats in one pattern: each adds a factor of the name's length to the worst case
  (3 repeats cost about 1 ms on a 90-character name; 4 about 20 ms, 5 about 0.5 s);
- patterns longer than MAX_PATTERN_LENGTH characters.
So the worst case of one match is polynomial, O(n^3) in the name's length n. Module names are short, so a
load stays within milliseconds per module. peft's own examples (`.*\\.(query|value)`,
`.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$`) pass.
"""

from __future__ import annotations

import functools
import re

try:  # Python >= 3.11
    from re import _constants as _sre_constants
    from re import _parser as _sre_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants
    import sre_parse as _sre_parser

MAX_REPEATS = 3
MAX_PATTERN_LENGTH = 1000
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_BACKREFERENCES = {"GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"}


def _problem(pattern: str) -> str | None:
    """Why `pattern` could backtrack catastrophically (or does not parse), or None if it is safe."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"it is {len(pattern)} characters long (at most {MAX_PATTERN_LENGTH})"
    try:
        parsed = _sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"it is not a valid regular expression ({e})"
    repeats = 0
    stack = [(list(parsed), False)]  # (items, inside a repeat)
    while stack:
        items, inside = stack.pop()
        for op, av in items:
            name = getattr(op, "name", str(op))
            if name in _REPEATS:
                low, high, sub = av
                unbounded = high is _sre_constants.MAXREPEAT or high > 1
                if unbounded:
                    if inside:
                        return "it has a repeat inside a repeat (like '(a+)+'), which can take exponential time"
                    repeats += 1
                stack.append((list(sub), inside or unbounded))
            elif name == "BRANCH":
                if inside:
                    return ("it has an alternation inside a repeat (like '(a|ab)*'), which can take exponential "
                            "time")
                stack.extend((list(sub), inside) for sub in av[1])
            elif name == "SUBPATTERN":
                stack.append((list(av[3]), inside))
            elif name in ("ASSERT", "ASSERT_NOT"):
                stack.append((list(av[1]), inside))
            elif name == "ATOMIC_GROUP":
                stack.append((list(av), inside))
            elif name in _BACKREFERENCES:
                return "it uses a backreference or conditional group, which can take exponential time"
    if repeats > MAX_REPEATS:
        return f"it has {repeats} repeats (at most {MAX_REPEATS}: each multiplies the worst-case matching time)"
    return None


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, field: str, prefix: str = "", suffix: str = "") -> re.Pattern:
    """prefix + pattern + suffix compiled, or a ValueError naming `field` if `pattern` is not a safe regex (see
    the module docstring). The guard looks at `pattern` alone: peft's prefixes/suffixes below are anchored by
    literal dots and add no blow-up (measured: ~1 ms per 90-character name with 3 repeats in `pattern`)."""
    if not isinstance(pattern, str):
        raise ValueError(f"NeatConfig.{field} must be a string regex, got {pattern!r}.")
    problem = _problem(pattern)
    if problem is None:
        try:
            return re.compile(prefix + pattern + suffix)
        except (re.error, RecursionError, OverflowError) as e:  # e.g. an entry ')(' that breaks the template
            problem = f"it is not a valid regular expression here ({e})"
    raise ValueError(f"NeatConfig.{field}: the regex {pattern!r} is refused: {problem}. Pass a simpler regex, "
                     "or a list of module names / name suffixes (matched literally).")


def target_regex(pattern: str, field: str = "target_modules") -> re.Pattern:
    """target_modules / exclude_modules given as one string: matched against the full module name."""
    return compile_pattern(pattern, field)


def modules_to_save_regex(entry: str) -> re.Pattern:
    """peft's rule: a module inside a modules_to_save entry is never adapted (the entry is a regex fragment)."""
    return compile_pattern(entry, "modules_to_save", r"(^|.*\.)", r"($|\..*)")


def layers_pattern_regex(pattern: str) -> re.Pattern:
    """peft's rule: the block index is the number after `<layers_pattern>.` (group 1)."""
    return compile_pattern(pattern, "layers_pattern", r"(?:^|.*?\.)", r"\.(\d+)\.")
