"""Named pipelines: TOML presets of model options, masking and outputs.

A pipeline file looks like this (every key is optional except ``description``)::

    description = "Six tissue classes of a whole-head T1-weighted scan"   # one line
    mask = "none"              # "none", "auto", a mask file (relative to this file), a template
                               # such as "{stem}_brainmask.nii.gz" or "bids" (segment batch)
    labels = ["background", "skull", "csf", "grey matter", "white matter", "fat"]

    [model]
    n_components = 6           # integer 1..255, or "auto" / "auto:2-8" (K chosen by BIC)
    max_iter = 300             # integer >= 1
    tol = 1e-4                 # number >= 0
    variance_floor = 1.0       # number > 0 (intensity^2)
    seed = 0                   # integer
    chunk_size = 262144        # integer >= 1

    [outputs]
    probseg = true
    qc = true

``labels`` names the classes in ascending mean intensity (label 1 first); it is used for
``dseg.tsv`` in BIDS mode and must have ``n_components`` entries.

Where presets are found
-----------------------
Built-in presets live in the repository's top-level ``pipelines/`` folder, one file per preset,
so there is a single copy that users can read.  :func:`preset_dirs` looks in

1. ``<repository>/pipelines`` next to the ``segment`` package: a source checkout and the
   editable install (``pip install -e .``) used in development and CI;
2. ``<sys.prefix>/share/segment/pipelines``: a regular (wheel) install, which copies the files
   there through ``[tool.setuptools.data-files]`` in ``pyproject.toml``.

A name is looked up in that order; anything that is a path to an existing file (or ends in
``.toml``) is read as a pipeline file instead.

Adding a key
------------
The ``[model]`` and ``[outputs]`` keys, their types and ranges come from the one option table,
:data:`segment._options.OPTIONS` (its ``section``): add the option there.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ._options import DEFAULT_SETTINGS, OPTIONS
from .exceptions import InputError
from .naming import label_names

__all__ = [
    "Check",
    "MODEL_KEYS",
    "OUTPUT_KEYS",
    "DEFAULT_SETTINGS",
    "Pipeline",
    "preset_dirs",
    "list_pipelines",
    "load_pipeline",
    "resolve_options",
]


# --------------------------------------------------------------------------------------------
# the schema: key -> check
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """How one key is validated: ``test(value)`` must be true; ``expected`` is said otherwise."""

    test: Callable[[Any], bool]
    expected: str


#: ``[model]`` keys and their checks, from the option table.
MODEL_KEYS: dict[str, Check] = {
    name: Check(option.accepts, option.expected())
    for name, option in OPTIONS.items()
    if option.section == "model"
}

#: ``[outputs]`` keys: which optional outputs to write.
OUTPUT_KEYS: dict[str, Check] = {
    name: Check(option.accepts, option.expected())
    for name, option in OPTIONS.items()
    if option.section == "outputs"
}

_TOP_KEYS = {
    "description": Check(
        lambda v: isinstance(v, str) and v.strip() != "" and "\n" not in v.strip(),
        "a one-line string",
    ),
    "mask": Check(
        OPTIONS["mask"].accepts,
        "'auto', 'none', 'bids', the path of a mask file or a template ({stem}, {rel})",
    ),
    "labels": Check(
        lambda v: isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v),
        "a list of class names (strings), in ascending mean intensity",
    ),
}
_SECTIONS = {"model": MODEL_KEYS, "outputs": OUTPUT_KEYS}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline preset.

    Attributes
    ----------
    name : str
        The file name without ``.toml``.
    path : Path
        The TOML file.
    description : str
        One line.
    options : dict
        ``[model]`` keys given in the file.
    mask : str or None
        ``"auto"``, ``"none"``, ``"bids"``, a mask template or an absolute mask path; ``None``
        when the file does not say.
    outputs : dict
        ``[outputs]`` keys given in the file: ``probseg`` and ``qc`` (bool), ``qc_histogram``
        (``"linear"`` or ``"log"``).
    labels : tuple of str
        Class names in ascending mean intensity (may be empty).
    sha256 : str
        Hex digest of the file's bytes.
    """

    name: str
    path: Path
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    mask: str | None = None
    outputs: dict[str, bool | str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    sha256: str = ""

    def settings(self) -> dict[str, Any]:
        """The settings this pipeline sets (model keys, ``mask`` and the ``[outputs]`` keys)."""
        settings = dict(self.options)
        if self.mask is not None:
            settings["mask"] = self.mask
        settings.update(self.outputs)
        return settings

    def record(self) -> dict[str, Any]:
        """What the JSON sidecar records about the pipeline."""
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256,
                "description": self.description}  # fmt: skip


def preset_dirs() -> list[Path]:
    """Folders searched for built-in presets, in order (see the module docstring)."""
    candidates = [
        Path(__file__).resolve().parents[1] / "pipelines",
        Path(sys.prefix) / "share" / "segment" / "pipelines",
    ]
    return [d for d in candidates if d.is_dir()]


def _presets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in preset_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def list_pipelines() -> list[Pipeline]:
    """The built-in presets, sorted by name (each validated)."""
    return [load_pipeline(path) for _, path in sorted(_presets().items())]


def load_pipeline(name_or_path: str | Path) -> Pipeline:
    """Load and validate a pipeline by preset name or file path.

    Raises
    ------
    InputError
        The file is missing or unreadable, is not valid TOML, or has an unknown section or
        key, a wrong type or value; the message names the file, the key and what was expected.
    """
    path = _find(name_or_path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputError(path, f"cannot read pipeline file: {error.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, f"not a valid TOML file: {error}") from None
    return _validate(document, path, hashlib.sha256(raw).hexdigest())


def _find(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    presets = _presets()
    if not looks_like_path and text in presets:
        return presets[text]
    if looks_like_path or path.exists():
        what = "is not a file" if path.exists() else "pipeline file not found"
        raise InputError(path, what)
    raise InputError(
        text,
        f"no such pipeline; built-in pipelines: {', '.join(sorted(presets)) or '(none found)'}"
        " (see `segment pipelines`), or give the path of a .toml file",
    )


def _fail(path: Path, key: str, expected: str, value: Any) -> InputError:
    return InputError(path, f"key {key!r}: expected {expected}, got {value!r}")


def _validate(document: dict[str, Any], path: Path, sha256: str) -> Pipeline:
    allowed = sorted([*_TOP_KEYS, *(f"[{s}]" for s in _SECTIONS)])
    for key, value in document.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise _fail(path, key, f"a [{key}] table", value)
            _check_table(path, key, value, _SECTIONS[key])
        elif key in _TOP_KEYS:
            if not _TOP_KEYS[key].test(value):
                raise _fail(path, key, _TOP_KEYS[key].expected, value)
        else:
            what = "section" if isinstance(value, dict) else "key"
            raise InputError(path, f"unknown {what} {key!r}; expected one of {', '.join(allowed)}")
    if "description" not in document:
        raise InputError(path, "key 'description': missing; expected a one-line string")
    model = dict(document.get("model", {}))
    labels = tuple(s.strip() for s in document.get("labels", ()))
    n_components = model.get("n_components", DEFAULT_SETTINGS["n_components"])
    if labels and isinstance(n_components, str):
        raise InputError(
            path,
            f"key 'labels': names need an integer model.n_components, got {n_components!r}; "
            "leave out labels (the classes are then named class1, class2...) or fix K",
        )
    if labels and len(labels) != n_components:
        raise InputError(
            path,
            f"key 'labels': expected {n_components} names (model.n_components), got {len(labels)}",
        )
    return Pipeline(
        name=path.name[: -len(".toml")] if path.name.endswith(".toml") else path.stem,
        path=path,
        description=document["description"].strip(),
        options=model,
        mask=_mask_spec(document.get("mask"), path),
        outputs=dict(document.get("outputs", {})),
        labels=labels,
        sha256=sha256,
    )


def _check_table(path: Path, section: str, table: dict, checks: Mapping[str, Check]) -> None:
    for key, value in table.items():
        if key not in checks:
            raise InputError(
                path,
                f"unknown key '{section}.{key}'; expected one of {', '.join(sorted(checks))}",
            )
        if not checks[key].test(value):
            raise _fail(path, f"{section}.{key}", checks[key].expected, value)


def _mask_spec(value: str | None, path: Path) -> str | None:
    """``auto``/``none``/``bids`` as they are; a template (``{stem}``, ``{rel}``) as it is, to
    be resolved for each scan; a mask path made absolute relative to the pipeline file."""
    if value is None or value.strip().lower() in ("auto", "none", "bids"):
        return None if value is None else value.strip().lower()
    if "{" in value or "}" in value:
        return value
    mask = Path(value).expanduser()
    return str(mask if mask.is_absolute() else (path.parent / mask).resolve())


# --------------------------------------------------------------------------------------------
# precedence
# --------------------------------------------------------------------------------------------
def resolve_options(
    pipeline: Pipeline | None, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge defaults < pipeline < explicit overrides.

    Parameters
    ----------
    pipeline : Pipeline or None
    overrides : dict
        Settings the user gave explicitly (e.g. on the command line); keys among
        :data:`DEFAULT_SETTINGS`.

    Returns
    -------
    settings : dict
        Every key of :data:`DEFAULT_SETTINGS`.
    sources : dict
        For each key, ``"default"``, ``"pipeline"`` or ``"command line"``.

    Examples
    --------
    >>> settings, sources = resolve_options(None, {"n_components": 3})
    >>> settings["n_components"], sources["n_components"], sources["tol"]
    (3, 'command line', 'default')
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(DEFAULT_SETTINGS)
    if unknown:
        expected = sorted(DEFAULT_SETTINGS)
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; expected {expected}")
    settings = dict(DEFAULT_SETTINGS)
    sources = dict.fromkeys(DEFAULT_SETTINGS, "default")
    for layer, source in ((pipeline.settings() if pipeline else {}, "pipeline"),
                          (overrides, "command line")):  # fmt: skip
        settings.update(layer)
        sources.update(dict.fromkeys(layer, source))
    return settings, sources


def class_names(pipeline: Pipeline | None, n_components: int) -> list[str]:
    """Names of labels 1..K: the pipeline's ``labels`` when they fit K, else ``class<k>``.

    The same names as :func:`segment.naming.label_names` gives a single run.
    """
    return label_names(pipeline.labels if pipeline is not None else None, n_components)
