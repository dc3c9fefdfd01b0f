"""Pipeline loading and validation: every invalid input is one line naming file and problem."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from executor.pipeline import PipelineError, find_cycle, load_pipeline

CODE = "def f(ctx, n=1):\n    return n\n\ndef g(ctx):\n    return 0\n\nnot_callable = 3\n"


def _write(root: Path, document: Any, code: str = CODE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else json.dumps(document)
    (root / "pipeline.json").write_text(text)
    (root / "mod.py").write_text(code)
    return root


def _doc(*tasks: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"format": 1, "name": "p", "tasks": list(tasks), **top}


def _t(task_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "call": "mod:f", **fields}


def test_valid_pipeline_applies_defaults(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        _doc(
            _t("a", args={"n": 2}),
            _t("b", after=["a"], retries=2, retry_delay=0.5, timeout=30, trigger="all_done"),
            defaults={"retries": 1, "timeout": 10},
        ),
    )
    pipeline = load_pipeline(root)
    assert pipeline.name == "p" and pipeline.root == root.resolve()
    a, b = pipeline.tasks["a"], pipeline.tasks["b"]
    assert (a.retries, a.retry_delay, a.timeout, a.trigger, a.after) == (
        1,
        1.0,
        10.0,
        "all_success",
        (),
    )
    assert (b.retries, b.retry_delay, b.timeout, b.trigger, b.after) == (
        2,
        0.5,
        30.0,
        "all_done",
        ("a",),
    )
    assert load_pipeline(root / "pipeline.json").tasks.keys() == pipeline.tasks.keys()


def test_validation_forgets_the_pipeline_modules(tmp_path: Path) -> None:
    load_pipeline(_write(tmp_path, _doc(_t("a"))))
    assert "mod" not in sys.modules
    assert str(tmp_path.resolve()) not in sys.path


INVALID: list[tuple[str, Any, str]] = [
    ("empty file", "", "pipeline.json is empty"),
    ("bad json", "{", "invalid JSON at line 1 column 2"),
    ("duplicate json key", '{"format": 1, "format": 1}', "key 'format' appears twice"),
    ("top not object", "[]", "the top level must be a JSON object"),
    ("unknown top key", {**_doc(_t("a")), "extra": 1}, "unknown top-level key 'extra'"),
    ("missing tasks", {"format": 1, "name": "p"}, "missing top-level key 'tasks'"),
    ("bad format", _doc(_t("a"), format=2), "unsupported format 2"),
    ("bool format", _doc(_t("a"), format=True), "unsupported format True"),
    ("bad name", _doc(_t("a"), name="a b"), "'name' must be a string"),
    ("empty tasks", _doc(), "'tasks' must be a non-empty list"),
    ("unknown default", _doc(_t("a"), defaults={"retry": 1}), "unknown key 'retry' in 'defaults'"),
    ("task not object", _doc("a"), "task #1 must be a JSON object"),  # type: ignore[arg-type]
    ("missing id", _doc({"call": "mod:f"}), "task #1: 'id' must be a string"),
    ("malformed id", _doc(_t("a/b")), "task #1: 'id' must be a string of [A-Za-z0-9_.-]"),
    ("duplicate id", _doc(_t("a"), _t("a")), "duplicate task id 'a'"),
    ("unknown task key", _doc(_t("a", afer=[])), "task 'a': unknown key 'afer'"),
    ("missing call", _doc({"id": "a"}), "task 'a': 'call' must be 'module:function'"),
    ("malformed call", _doc(_t("a", call="mod.f")), "'call' must be 'module:function', not"),
    ("args not object", _doc(_t("a", args=[1])), "task 'a': 'args' must be a JSON object"),
    ("after not list", _doc(_t("a", after="b")), "task 'a': 'after' must be a list"),
    ("after twice", _doc(_t("a"), _t("b", after=["a", "a"])), "'after' lists a task twice"),
    ("unknown after", _doc(_t("a", after=["zz"])), "task 'a': 'after' names unknown 'zz'"),
    ("string retries", _doc(_t("a", retries="2")), "'retries' must be an integer >= 0"),
    ("bool retries", _doc(_t("a", retries=True)), "'retries' must be an integer >= 0"),
    ("negative retries", _doc(_t("a", retries=-1)), "'retries' must be an integer >= 0"),
    ("bad retry delay", _doc(_t("a", retry_delay=-1)), "'retry_delay' must be a number >= 0"),
    ("zero timeout", _doc(_t("a", timeout=0)), "'timeout' must be a number > 0 or null"),
    ("string timeout", _doc(_t("a", timeout="5")), "'timeout' must be a number > 0 or null"),
    ("bad trigger", _doc(_t("a", trigger="any")), "'trigger' must be all_success or all_done"),
    ("self cycle", _doc(_t("a", after=["a"])), "dependency cycle: a -> a"),
    (
        "cycle",
        _doc(_t("a", after=["c"]), _t("b", after=["a"]), _t("c", after=["b"])),
        "dependency cycle: a -> c -> b -> a",
    ),
    ("missing module", _doc(_t("a", call="nomod:f")), "cannot import: ModuleNotFoundError"),
    ("missing function", _doc(_t("a", call="mod:nope")), "cannot import: AttributeError"),
    ("not callable", _doc(_t("a", call="mod:not_callable")), "is not callable"),
    ("bad args", _doc(_t("a", call="mod:g", args={"n": 1})), "does not accept fn(ctx, **args)"),
]


@pytest.mark.parametrize(
    ("document", "problem"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_pipeline_names_file_and_problem(
    tmp_path: Path, document: Any, problem: str
) -> None:
    root = _write(tmp_path, document)
    with pytest.raises(PipelineError) as caught:
        load_pipeline(root)
    message = str(caught.value)
    assert message.startswith(f"{root / 'pipeline.json'}: ")
    assert problem in message
    assert "\n" not in message


def test_module_that_fails_to_import_is_reported(tmp_path: Path) -> None:
    root = _write(tmp_path, _doc(_t("a")), code="raise RuntimeError('broken module')\n")
    with pytest.raises(PipelineError, match="cannot import: RuntimeError: broken module"):
        load_pipeline(root)


def test_module_exiting_or_printing_at_import(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = _write(tmp_path, _doc(_t("a")), code="print('noise')\nraise SystemExit(3)\n")
    with pytest.raises(PipelineError, match="cannot import: SystemExit: 3"):
        load_pipeline(root)
    captured = capfd.readouterr()
    assert captured.out == "" and "noise" in captured.err


def test_imports_happen_in_a_child_the_caller_keeps_nothing(tmp_path: Path) -> None:
    code = "import os\nos.environ['IMPORTED_IN'] = str(os.getpid())\ndef f(ctx):\n    pass\n"
    root = _write(tmp_path, _doc(_t("a")), code=code)
    load_pipeline(root)
    assert "IMPORTED_IN" not in os.environ and "mod" not in sys.modules
    assert str(root) not in sys.path


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("import os\nos._exit(7)\n", "ended (exit code 7) while importing mod:f"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by signal 9"),
        (
            "raise ValueError('first line\\nsecond line\\nthird')\n",
            "cannot import: ValueError: first line",
        ),
    ],
    ids=["os._exit", "SIGKILL", "multi-line error"],
)
def test_a_module_that_ends_the_process_is_one_line(
    tmp_path: Path, code: str, problem: str
) -> None:
    root = _write(tmp_path, _doc(_t("a")), code=code)
    with pytest.raises(PipelineError) as caught:
        load_pipeline(root)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_a_module_that_hangs_is_stopped_at_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "still-running"
    code = (
        "import os, subprocess, time\n"  # a leftover process, and a hang
        f"subprocess.Popen(['sh', '-c', 'sleep 3; touch {marker}'])\n"
        "time.sleep(600)\n"
    )
    root = _write(tmp_path / "p", _doc(_t("a")), code=code)
    monkeypatch.setenv("EXECUTOR_IMPORT_TIMEOUT_S", "1")
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"did not import within 1 s .* \(importing mod:f\)"):
        load_pipeline(root)
    assert time.monotonic() - started < 30
    time.sleep(4)
    assert not marker.exists(), "what the import started was killed with it"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_import_time_limit_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("EXECUTOR_IMPORT_TIMEOUT_S", value)
    with pytest.raises(PipelineError, match="EXECUTOR_IMPORT_TIMEOUT_S: .* not a positive"):
        load_pipeline(_write(tmp_path, _doc(_t("a"))))


def test_not_utf8(tmp_path: Path) -> None:
    _write(tmp_path, "x")
    (tmp_path / "pipeline.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(PipelineError, match="is not UTF-8 text"):
        load_pipeline(tmp_path)


def test_missing_path_and_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no such file or directory"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(PipelineError, match="cannot read pipeline.json"):
        load_pipeline(tmp_path)


def test_corrupt_and_incomplete_archives(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(PipelineError, match=r"corrupt\.tar\.gz: not a valid \.tar\.gz archive"):
        load_pipeline(corrupt)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("other.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(PipelineError, match="pipeline.json is missing at the archive root"):
        load_pipeline(empty)


def test_archive_errors_name_the_archive(tmp_path: Path) -> None:
    root = _write(tmp_path / "src", _doc(_t("a", after=["zz"])))
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "pipeline.json", arcname="pipeline.json")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(archive)
    assert str(caught.value).startswith(f"{archive}: ")


def test_find_cycle_on_a_dag_is_empty(tmp_path: Path) -> None:
    root = _write(tmp_path, _doc(_t("a"), _t("b", after=["a"]), _t("c", after=["a", "b"])))
    assert find_cycle(load_pipeline(root).tasks) == []


def _archive_with(tmp_path: Path, member: tarfile.TarInfo) -> Path:
    root = _write(tmp_path / "src", _doc(_t("a")))
    archive = tmp_path / "p.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "pipeline.json", arcname="pipeline.json")
        tar.add(root / "mod.py", arcname="mod.py")
        tar.addfile(member, io.BytesIO(b"x" * member.size))
    return archive


@pytest.mark.parametrize("without_filters", [False, True], ids=["filters", "python-3.11.2"])
@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escape.txt"),
        tarfile.TarInfo("/etc/evil.txt"),
        tarfile.TarInfo("link"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_archive_members_outside_or_not_plain_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: tarfile.TarInfo, without_filters: bool
) -> None:
    if member.name == "link":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        member.size = 1
    if without_filters:  # Debian 12's Python 3.11.2, which the images run, has none
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = _archive_with(tmp_path, member)
    with pytest.raises(PipelineError, match=f"refusing member '{member.name}'"):
        load_pipeline(archive)
    assert not (tmp_path / "escape.txt").exists()


def test_archive_loads_without_extraction_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    info = tarfile.TarInfo("data/extra.txt")
    info.size = 3
    pipeline = load_pipeline(_archive_with(tmp_path, info))
    assert (pipeline.root / "data" / "extra.txt").read_text() == "xxx"
