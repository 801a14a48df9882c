"""Declarative routing rules: DICOM attributes of a series -> models and destinations.

Rules come from the ``routes:`` list of the configuration (kept raw by
:mod:`dicomnode.config`) and are parsed here into frozen dataclasses, validated
once at load against the known model names and the configured destinations.
Evaluation is pure data: no ``eval``, no user code.

Semantics
---------
* Rules are tried in order; the **first** rule whose every condition holds wins.
  A rule marked ``default: true`` matches everything; it must be the last rule.
* When no rule matches, the series is only stored (:attr:`RouteDecision.matched`
  is ``False``).
* Conditions are evaluated on one representative instance's header. For a
  multi-valued attribute (``ImageType``, ``ImageOrientationPatient``...) a
  condition holds when **any** value satisfies it; ``not:`` inverts the whole
  condition, so ``ImageType: {not: LOCALIZER}`` means "no value is LOCALIZER".
* ``equals`` compares text after stripping DICOM padding, case-sensitively;
  a number compares numerically (``SliceThickness: 1`` matches ``"1.0"``).
* ``regex`` uses :func:`re.search` (anchor with ``^...$`` for a full match).
* ``exists: true`` means present with a non-empty value; ``missing: true``
  means absent or empty (type 2 attributes are often present but empty).

YAML syntax (see docs/routing.md)::

    routes:
      - name: mr-brain-t1
        when:
          Modality: MR                                # equals
          SeriesDescription: {regex: "(?i)t1"}
          ImageType: {not: {in: [LOCALIZER, DERIVED]}}
          SliceThickness: {min: 0.5, max: 2.0}
          calling_aet: {in: [MR_SCANNER_1, ORTHANC]}
        models: [deepbet-brain]
        send: [pacs, {to: research, formats: [seg]}]
        forward: [archive]                            # the original instances
        priority: 10
      - name: everything-else
        default: true
        forward: [archive]
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.config import DestinationConfig, Settings
from dicomnode.domain import InstanceRef
from dicomnode.errors import RoutingError

#: Keys of ``when:`` that are not DICOM keywords but association properties.
AE_KEYS = ("calling_aet", "called_aet")
#: Operators a condition mapping may use.
OPERATORS = ("equals", "in", "regex", "min", "max", "exists", "missing", "not")
#: Output formats a destination may receive (see ``DestinationConfig.formats``).
FORMATS = ("seg", "sr", "sc")
_RULE_KEYS = ("name", "when", "default", "models", "send", "forward", "notify", "priority",
              "discard")

Scalar = str | int | float


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Condition:
    """One test on one attribute.

    Exactly one kind of test is set: ``equals``, ``one_of``, ``regex``, a
    numeric range (``minimum``/``maximum``, either may be open), ``exists``
    (``True``: present and non-empty, ``False``: missing) or ``negated``
    (an inner condition that must *not* hold).
    """

    key: str  # DICOM keyword or one of AE_KEYS
    equals: Scalar | None = None
    one_of: tuple[Scalar, ...] | None = None
    regex: re.Pattern[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exists: bool | None = None
    negated: Condition | None = None

    def describe(self) -> str:
        """Human-readable form, used by ``routes explain``."""
        if self.negated is not None:
            return f"not ({self.negated.describe()})"
        if self.exists is not None:
            return f"{self.key} {'exists' if self.exists else 'is missing'}"
        if self.equals is not None:
            return f"{self.key} == {self.equals!r}"
        if self.one_of is not None:
            return f"{self.key} in {list(self.one_of)!r}"
        if self.regex is not None:
            return f"{self.key} ~ /{self.regex.pattern}/"
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "+inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{self.key} in [{lo}, {hi}]"


@dataclass(frozen=True)
class SendTarget:
    """Which result formats one destination receives."""

    destination: str
    formats: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """A parsed routing rule.

    ``conditions`` are ANDed. ``default`` rules have no conditions and match
    everything.
    """

    name: str
    index: int
    conditions: tuple[Condition, ...] = ()
    default: bool = False
    models: tuple[str, ...] = ()
    send: tuple[SendTarget, ...] = ()
    forward: tuple[str, ...] = ()
    priority: int = 0
    discard: bool = False
    notify: tuple[str, ...] = ()  # notification targets told about each model result

    @property
    def label(self) -> str:
        """``routes[i] (name)`` as used in messages."""
        return f"routes[{self.index}] ({self.name})"


@dataclass(frozen=True)
class RouteDecision:
    """What to do with one series.

    ``rule`` is ``None`` when no rule matched: store only, run nothing.
    """

    rule: Rule | None
    models: tuple[str, ...] = ()
    send: tuple[SendTarget, ...] = ()
    forward: tuple[str, ...] = ()
    priority: int = 0
    discard: bool = False
    notify: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        return self.rule is not None

    def formats_for(self, destination: str) -> tuple[str, ...]:
        """Result formats going to ``destination`` (empty if it gets none)."""
        for d in self.send:
            if d.destination == destination:
                return d.formats
        return ()


@dataclass(frozen=True)
class ConditionResult:
    condition: Condition
    ok: bool
    reason: str  # what the dataset had, e.g. "Modality is 'CT', expected 'MR'"


@dataclass(frozen=True)
class RuleExplanation:
    """How one rule fared against one dataset."""

    rule: Rule
    matched: bool
    results: tuple[ConditionResult, ...] = field(default_factory=tuple)

    @property
    def reasons(self) -> list[str]:
        """Why it failed (the failed conditions), or why it matched (all of them)."""
        if self.matched:
            return [r.reason for r in self.results] or ["default rule: matches everything"]
        return [r.reason for r in self.results if not r.ok]


# --------------------------------------------------------------------------- parsing


def _fail(where: str, key: str, problem: str) -> RoutingError:
    return RoutingError(f"{where}: {key}: {problem}")


def _check_keyword(where: str, key: str) -> None:
    if key in AE_KEYS:
        return
    if not isinstance(key, str) or tag_for_keyword(key) is None:
        raise _fail(
            where, f"when.{key}",
            f"unknown DICOM keyword {key!r} (use a keyword such as Modality or "
            f"SeriesDescription, or one of {', '.join(AE_KEYS)})",
        )


def _scalar(where: str, key: str, value: Any) -> Scalar:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail(where, key, f"expected a text or number, got {value!r}")
    return value


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _fail(where, key, f"expected a number, got {value!r}")
    return float(value)


def _parse_condition(where: str, attr: str, spec: Any, path: str) -> Condition:
    """Parse the value of ``when.<attr>`` (``path`` names it in errors)."""
    if isinstance(spec, list | tuple):  # shorthand for {in: [...]}
        spec = {"in": list(spec)}
    if not isinstance(spec, Mapping):
        return Condition(attr, equals=_scalar(where, path, spec))
    if not spec:
        raise _fail(where, path, "empty condition (use equals, in, regex, min/max, exists, "
                    "missing or not)")
    unknown = [k for k in spec if k not in OPERATORS]
    if unknown:
        raise _fail(where, f"{path}.{unknown[0]}",
                    f"unknown operator (known: {', '.join(OPERATORS)})")
    ops = set(spec)
    if ops - {"min", "max"} and len(ops) > 1:
        raise _fail(where, path, f"one operator per condition, got {sorted(ops)} "
                    "(list several attributes, or nest with not:)")
    if "not" in spec:
        return Condition(attr, negated=_parse_condition(where, attr, spec["not"], f"{path}.not"))
    if "equals" in spec:
        return Condition(attr, equals=_scalar(where, f"{path}.equals", spec["equals"]))
    if "in" in spec:
        values = spec["in"]
        if not isinstance(values, list | tuple) or not values:
            raise _fail(where, f"{path}.in", f"expected a non-empty list, got {values!r}")
        return Condition(attr, one_of=tuple(
            _scalar(where, f"{path}.in[{i}]", v) for i, v in enumerate(values)))
    if "regex" in spec:
        pattern = spec["regex"]
        if not isinstance(pattern, str):
            raise _fail(where, f"{path}.regex", f"expected a text pattern, got {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise _fail(where, f"{path}.regex",
                        f"bad regular expression {pattern!r}: {exc}") from None
        return Condition(attr, regex=compiled)
    if "exists" in spec or "missing" in spec:
        op = "exists" if "exists" in spec else "missing"
        flag = spec[op]
        if not isinstance(flag, bool):
            raise _fail(where, f"{path}.{op}", f"expected true or false, got {flag!r}")
        return Condition(attr, exists=flag if op == "exists" else not flag)
    lo = _number(where, f"{path}.min", spec["min"]) if "min" in spec else None
    hi = _number(where, f"{path}.max", spec["max"]) if "max" in spec else None
    if lo is not None and hi is not None and lo > hi:
        raise _fail(where, path, f"min {lo:g} is greater than max {hi:g}")
    return Condition(attr, minimum=lo, maximum=hi)


def _names(where: str, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _fail(where, key, f"expected a list of names, got {value!r}")
    return list(value)


def _parse_rule(
    index: int,
    raw: Any,
    model_names: Collection[str],
    destinations: Mapping[str, DestinationConfig],
    notifications: Collection[str] = (),
) -> Rule:
    if not isinstance(raw, Mapping):
        raise RoutingError(f"routes[{index}]: must be a mapping, got {type(raw).__name__}")
    name = raw.get("name", f"#{index}")
    if not isinstance(name, str) or not name.strip():
        raise RoutingError(f"routes[{index}]: name: expected a non-empty text, got {name!r}")
    where = f"routes[{index}] ({name})"
    unknown = [k for k in raw if k not in _RULE_KEYS]
    if unknown:
        raise _fail(where, str(unknown[0]), f"unknown key (known: {', '.join(_RULE_KEYS)})")

    default = raw.get("default", False)
    if not isinstance(default, bool):
        raise _fail(where, "default", f"expected true or false, got {default!r}")
    when = raw.get("when")
    conditions: list[Condition] = []
    if default:
        if when:
            raise _fail(where, "when", "a default rule matches everything; remove when:")
    else:
        if when is None:
            raise _fail(where, "when", "required (or mark the rule default: true)")
        if not isinstance(when, Mapping) or not when:
            raise _fail(where, "when", "expected a non-empty mapping of attribute: condition")
        for attr, spec in when.items():
            _check_keyword(where, attr)
            conditions.append(_parse_condition(where, attr, spec, f"when.{attr}"))

    models = _names(where, "models", raw.get("models", []))
    for i, m in enumerate(models):
        if m not in model_names:
            known = ", ".join(sorted(model_names)) or "none installed"
            raise _fail(where, f"models[{i}]", f"unknown model {m!r} (known: {known})")
    if len(set(models)) != len(models):
        raise _fail(where, "models", "a model is listed twice")

    def check_destination(key: str, dest: Any) -> str:
        if not isinstance(dest, str) or dest not in destinations:
            known = ", ".join(sorted(destinations)) or "none configured"
            raise _fail(where, key, f"unknown destination {dest!r} (known: {known})")
        return dest

    send: list[SendTarget] = []
    raw_send = raw.get("send", [])
    if isinstance(raw_send, str | Mapping):
        raw_send = [raw_send]
    if not isinstance(raw_send, list | tuple):
        raise _fail(where, "send", f"expected a list of destinations, got {raw_send!r}")
    for i, item in enumerate(raw_send):
        key = f"send[{i}]"
        if isinstance(item, Mapping):
            extra = [k for k in item if k not in ("to", "formats")]
            if extra:
                raise _fail(where, f"{key}.{extra[0]}", "unknown key (known: to, formats)")
            dest = check_destination(f"{key}.to", item.get("to"))
            if "formats" in item:
                formats = _names(where, f"{key}.formats", item["formats"])
                bad = [f for f in formats if f not in FORMATS]
                if bad or not formats:
                    raise _fail(where, f"{key}.formats",
                                f"unknown format(s) {bad or formats}; use {', '.join(FORMATS)}")
            else:
                formats = list(destinations[dest].formats)
        else:
            dest = check_destination(key, item)
            formats = list(destinations[dest].formats)
        if any(d.destination == dest for d in send):
            raise _fail(where, key, f"destination {dest!r} is listed twice")
        send.append(SendTarget(dest, tuple(dict.fromkeys(formats))))
    if send and not models:
        raise _fail(where, "send", "results are sent only when models: runs at least one model "
                    "(use forward: to pass the original instances on)")

    forward = [check_destination(f"forward[{i}]", d)
               for i, d in enumerate(_names(where, "forward", raw.get("forward", [])))]
    if len(set(forward)) != len(forward):
        raise _fail(where, "forward", "a destination is listed twice")

    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise _fail(where, "priority", f"expected an integer, got {priority!r}")
    notify = _names(where, "notify", raw.get("notify", []))
    for i, n in enumerate(notify):
        if n not in notifications:
            known = ", ".join(sorted(notifications)) or "none configured"
            raise _fail(where, f"notify[{i}]", f"unknown notification {n!r} (known: {known})")
    if len(set(notify)) != len(notify):
        raise _fail(where, "notify", "a notification is listed twice")
    if notify and not models:
        raise _fail(where, "notify", "notifications tell about model results: give models: too")
    discard = raw.get("discard", False)
    if not isinstance(discard, bool):
        raise _fail(where, "discard", f"expected true or false, got {discard!r}")
    if discard and (models or send or forward):
        raise _fail(where, "discard", "a discarding rule cannot also run models, send or forward")
    if not (discard or models or forward):
        raise _fail(where, "models", "the rule does nothing: give models:, forward: or "
                    "discard: true")
    return Rule(name=name, index=index, conditions=tuple(conditions), default=default,
                models=tuple(models), send=tuple(send), forward=tuple(forward),
                priority=priority, discard=discard, notify=tuple(notify))


# --------------------------------------------------------------------------- evaluation


def _values(ds: Dataset, keyword: str) -> list[Any] | None:
    """The attribute's values as a flat list, ``None`` when absent or empty.

    File meta keywords (group 0002, e.g. ``TransferSyntaxUID``) are looked up
    in the file meta information, where pydicom keeps them.
    """
    tag = tag_for_keyword(keyword)
    if tag is not None and tag >> 16 == 0x0002:
        ds = getattr(ds, "file_meta", None) or Dataset()
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or value == "" or (isinstance(value, bytes) and not value):
        return None
    if isinstance(value, DicomSequence):
        return [value] if len(value) else None
    if isinstance(value, MultiValue | list | tuple):
        items = [v for v in value if v is not None and str(v).strip() != ""]
        return items or None
    return [value]


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("latin-1", "replace").strip(" \x00")
    return str(v).strip(" \x00")


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _equal(actual: Any, expected: Scalar) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        f = _as_float(actual)
        return f is not None and f == float(expected)
    return _text(actual) == expected


def _show(values: Sequence[Any] | None) -> str:
    if values is None:
        return "missing"
    if len(values) == 1:
        return repr(_text(values[0]))
    return repr([_text(v) for v in values])


def _evaluate(cond: Condition, values: list[Any] | None) -> ConditionResult:
    key = cond.key
    if cond.negated is not None:
        inner = _evaluate(cond.negated, values)
        return ConditionResult(cond, not inner.ok,
                               f"{key} is {_show(values)}, required {cond.describe()}")
    if cond.exists is not None:
        present = values is not None
        return ConditionResult(cond, present == cond.exists,
                               f"{key} is {'present' if present else 'missing'}, "
                               f"required {'present' if cond.exists else 'missing'}")
    if values is None:
        return ConditionResult(cond, False, f"{key} is missing, required {cond.describe()}")
    if any(isinstance(v, DicomSequence) for v in values):
        return ConditionResult(cond, False, f"{key} is a sequence; only exists/missing "
                               "apply to sequences")
    if cond.equals is not None:
        ok = any(_equal(v, cond.equals) for v in values)
    elif cond.one_of is not None:
        ok = any(_equal(v, e) for v in values for e in cond.one_of)
    elif cond.regex is not None:
        pattern = cond.regex
        ok = any(pattern.search(_text(v)) is not None for v in values)
    else:
        nums = [_as_float(v) for v in values]
        ok = any(
            f is not None
            and (cond.minimum is None or f >= cond.minimum)
            and (cond.maximum is None or f <= cond.maximum)
            for f in nums
        )
        if not ok and all(f is None for f in nums):
            return ConditionResult(cond, False, f"{key} is {_show(values)}, not a number; "
                                   f"required {cond.describe()}")
    return ConditionResult(cond, ok, f"{key} is {_show(values)}, required {cond.describe()}")


def _check_dataset_keyword(keyword: str) -> None:
    # Accessing an unknown keyword on a Dataset raises; rules were validated, so
    # this only guards callers that build Rules by hand.
    if keyword not in AE_KEYS and tag_for_keyword(keyword) is None:
        raise RoutingError(f"unknown DICOM keyword {keyword!r}")


#: Instances read at most to find one that is not a scout (see :func:`representative`).
REPRESENTATIVE_TRIES = 8


def is_localizer(ds: Dataset) -> bool:
    """ImageType says LOCALIZER (or SCOUT): a scout image, not part of a volume."""
    values = _values(ds, "ImageType") or []
    return any(_text(v).upper() in ("LOCALIZER", "SCOUT") for v in values)


def representative(instances: Sequence[InstanceRef]) -> Dataset:
    """The header rules are evaluated on: the series' lowest Instance Number that is
    not a LOCALIZER (scout) image.

    Scanners often put the scout first in the series it was taken for; the
    rules are about the images the models run on. Up to
    :data:`REPRESENTATIVE_TRIES` headers are read; when all are scouts, the
    first is used. Ties and unnumbered instances fall back to the path order,
    so the choice is stable. Pixel data is not read.
    """
    if not instances:
        raise RoutingError("cannot route an empty series")
    ordered = sorted(instances, key=lambda i: (i.instance_number is None,
                                               i.instance_number or 0, str(i.path)))
    first: Dataset | None = None
    for ref in ordered[:REPRESENTATIVE_TRIES]:
        ds = dcmread(ref.path, stop_before_pixels=True)
        if not is_localizer(ds):
            return ds
        first = first if first is not None else ds
    assert first is not None
    return first


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class RoutingTable:
    """Ordered rules with first-match semantics (see the module docstring)."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(
        cls,
        routes: Iterable[Any],
        model_names: Collection[str],
        destinations: Iterable[DestinationConfig] | Mapping[str, DestinationConfig],
        notifications: Collection[str] = (),
    ) -> RoutingTable:
        """Parse and validate raw rules.

        Raises
        ------
        RoutingError
            Naming the rule (``routes[i] (name)``) and the key at fault.
        """
        dests = (dict(destinations) if isinstance(destinations, Mapping)
                 else {d.name: d for d in destinations})
        rules: list[Rule] = []
        names: dict[str, int] = {}
        for i, raw in enumerate(routes):
            rule = _parse_rule(i, raw, model_names, dests, notifications)
            if rules and rules[-1].default:
                raise RoutingError(
                    f"{rule.label}: unreachable: it follows the default rule "
                    f"{rules[-1].label}; the default rule must be last")
            if isinstance(raw, Mapping) and "name" in raw:
                if rule.name in names:
                    raise RoutingError(f"{rule.label}: name: duplicate rule name {rule.name!r} "
                                       f"(also routes[{names[rule.name]}])")
                names[rule.name] = i
            rules.append(rule)
        return cls(tuple(rules))

    @classmethod
    def from_settings(cls, settings: Settings, model_names: Collection[str]) -> RoutingTable:
        """Parse ``settings.routes`` against ``model_names`` and ``settings.destinations``."""
        return cls.parse(settings.routes, model_names, settings.destinations,
                         [n.name for n in settings.notifications])

    @property
    def default(self) -> Rule | None:
        return self.rules[-1] if self.rules and self.rules[-1].default else None

    def _evaluate_rule(
        self, rule: Rule, ds: Dataset, calling_aet: str, called_aet: str
    ) -> RuleExplanation:
        results = []
        for cond in rule.conditions:
            if cond.key == "calling_aet":
                values: list[Any] | None = [calling_aet] if calling_aet.strip() else None
            elif cond.key == "called_aet":
                values = [called_aet] if called_aet.strip() else None
            else:
                _check_dataset_keyword(cond.key)
                values = _values(ds, cond.key)
            results.append(_evaluate(cond, values))
        return RuleExplanation(rule, all(r.ok for r in results), tuple(results))

    def explain(
        self, dataset: Dataset, calling_aet: str = "", called_aet: str = ""
    ) -> list[RuleExplanation]:
        """Evaluate rules in order up to and including the first match.

        Every entry but the last did not match; the last matched unless no
        rule matched at all (then every rule is listed, none matched).
        """
        out = []
        for rule in self.rules:
            exp = self._evaluate_rule(rule, dataset, calling_aet, called_aet)
            out.append(exp)
            if exp.matched:
                break
        return out

    def match(self, dataset: Dataset, calling_aet: str = "", called_aet: str = "") -> RouteDecision:
        """The decision of the first matching rule (or an empty, unmatched one)."""
        explained = self.explain(dataset, calling_aet, called_aet)
        if explained and explained[-1].matched:
            r = explained[-1].rule
            return RouteDecision(rule=r, models=r.models, send=r.send, forward=r.forward,
                                 priority=r.priority, discard=r.discard, notify=r.notify)
        return RouteDecision(rule=None)

