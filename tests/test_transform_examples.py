"""The example user steps in examples/transforms/, loaded by dotted path and by entry point."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

import pipeline.plugins
from pipeline.config import ConfigError, TransformSettings, TransformStep, load_settings
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.plugins import TRANSFORM_GROUP
from pipeline.transform import build_chain

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "transforms"
SHOUT_PROJECT = EXAMPLES / "echo_relay_shout"


def meta(**room: Any) -> UtteranceMeta:
    return UtteranceMeta(utterance_id="u1", audio_start_s=0.0, audio_end_s=1.0, room=dict(room),
                         language="en")  # English text: the filler step applies English fillers


@pytest.fixture
def example_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(SHOUT_PROJECT))
    yield
    for name in [m for m in sys.modules if m in ("example_steps", "echo_relay_shout")]:
        del sys.modules[name]


@pytest.fixture
def shout_entry_point(monkeypatch: pytest.MonkeyPatch, example_path: None) -> EntryPoint:
    """Make `shout` discoverable as if `pip install examples/transforms/echo_relay_shout` had run:
    the entry point is read from the example's own pyproject.toml."""
    project = tomllib.loads((SHOUT_PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = project["project"]["entry-points"][TRANSFORM_GROUP]
    eps = [EntryPoint(name=name, value=value, group=TRANSFORM_GROUP) for name, value in declared.items()]
    real = pipeline.plugins.entry_points

    def fake_entry_points(**kw: Any) -> Any:
        if kw.get("group") == TRANSFORM_GROUP:
            return eps
        return real(**kw)

    monkeypatch.setattr(pipeline.plugins, "entry_points", fake_entry_points)
    return next(ep for ep in eps if ep.name == "shout")


async def test_dotted_path_examples(example_path: None) -> None:
    m = Metrics()
    chain = build_chain(TransformSettings(steps=[
        TransformStep(step="example_steps:skip_while_replica_speaks"),  # plain function
        TransformStep(step="example_steps:min_words", count=3),          # factory with an option
        TransformStep(step="example_steps.glossary"),                    # async function, dot form
    ]), m)
    assert [s.is_async for s in chain.steps] == [False, False, True]
    out = await chain.run("welcome to tavus and echo relay", meta())
    assert out.text == "welcome to Tavus and echo-relay"
    short = await chain.run("okay then", meta())
    assert short.dropped and short.dropped_by is not None
    assert short.dropped_by.step == "example_steps:min_words"
    busy = await chain.run("this is long enough", meta(replica_speaking=True))
    assert busy.dropped and busy.dropped_by is not None
    assert busy.dropped_by.step == "example_steps:skip_while_replica_speaks"
    assert m.value("echo_relay_dropped_total",
                   {"stage": "transform", "reason": "dropped_by:example_steps:min_words"}) == 1


def test_dotted_path_factory_error(example_path: None) -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(TransformSettings(steps=[TransformStep(step="example_steps:min_words", count=0)]))
    assert ei.value.key == "transform.steps[0]" and "count must be >= 1" in str(ei.value)


def test_entry_point_declared_by_example(shout_entry_point: EntryPoint) -> None:
    assert shout_entry_point.value == "echo_relay_shout:Shout"


async def test_entry_point_class_step_with_options(shout_entry_point: EntryPoint, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "transform:\n"
        "  steps:\n"
        "    - step: filler_words\n"
        "    - step: shout\n"
        "      words: [never, always]\n"
        "    - step: shout\n"
        "      exclaim: false\n", encoding="utf-8")
    settings = load_settings(cfg, env={})
    chain = build_chain(settings.transform, Metrics())
    out = await chain.run("Um, I never said always.", meta())
    # step 2 upper-cases the words and ends with "!", step 3 upper-cases everything
    assert out.text == "I NEVER SAID ALWAYS!"
    first = build_chain(TransformSettings(steps=[TransformStep(step="shout", words=["never"])]))
    assert (await first.run("I never did.", meta())).text == "I NEVER did!"


def test_entry_point_option_errors(shout_entry_point: EntryPoint) -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(TransformSettings(steps=[TransformStep(step="shout", volume=11)]))
    assert ei.value.key == "transform.steps[0].volume" and "words" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        build_chain(TransformSettings(steps=[TransformStep(step="shout", words=[""])]))
    assert ei.value.key == "transform.steps[0]"


def test_unknown_name_lists_entry_points(shout_entry_point: EntryPoint) -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(TransformSettings(steps=[TransformStep(step="whisper")]))
    assert ei.value.key == "transform.steps[0].step" and "shout" in str(ei.value)


async def test_entry_point_found_by_real_metadata_discovery(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            example_path: None) -> None:
    """No monkeypatching of entry_points: write the dist-info `pip install` would create (from the
    example's pyproject.toml) onto sys.path and let importlib.metadata find it."""
    project = tomllib.loads((SHOUT_PROJECT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dist_info = tmp_path / f"echo_relay_shout-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", encoding="utf-8")
    declared = project["entry-points"][TRANSFORM_GROUP]
    lines = [f"[{TRANSFORM_GROUP}]"] + [f"{k} = {v}" for k, v in declared.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    chain = build_chain(TransformSettings(steps=[TransformStep(step="shout", exclaim=False)]))
    assert (await chain.run("Hello there.", meta())).text == "HELLO THERE."
