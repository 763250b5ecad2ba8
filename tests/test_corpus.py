import json

import pytest

from mtlsp_model.corpus import (
    MAX_FILE_BYTES,
    build_documents,
    load_manifest,
    normalize_name,
    corpus_manifest,
    refuse_trained_on,
)


def make_site_packages(root):
    files = {
        "alpha/__init__.py": "A = 1\n",
        "alpha/core.py": "def core():\n    return 1\n",
        "alpha/sub/__init__.py": "",
        "alpha/sub/x.py": "X = 'x'\n",
        "alpha/sub/y.py": "Y = 'y'\n",
        "alpha/sub/deeper/z.py": "Z = 'z'\n",
        "alpha/other/w.py": "W = 1\n",
        "alpha/data.json": "{}",
        "Flask/app.py": "app = 1\n",  # excluded: pallets/flask, however it is capitalised
        "pydantic/main.py": "class BaseModel: ...\n",
        "single_module.py": "def single():\n    pass\n",
        "alpha-1.0.dist-info/METADATA": "Name: alpha",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "alpha" / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (root / "alpha" / "binary.py").write_bytes(b"\x00\x01\x02")
    (root / "alpha" / "huge.py").write_text("x = 1\n" * (MAX_FILE_BYTES // 6 + 1))
    return root


def test_documents_and_exclusions(tmp_path):
    root = make_site_packages(tmp_path / "site")
    docs, skipped = build_documents([root], seed=7)
    assert sorted(d.name for d in docs) == ["alpha", "single_module"]
    assert sorted(skipped) == ["Flask", "pydantic"]
    alpha = next(d for d in docs if d.name == "alpha")
    paths = [f.path for f in alpha.files]
    # non-UTF-8, binary, oversized, empty and non-source files are skipped
    assert sorted(paths) == sorted(["alpha/__init__.py", "alpha/core.py", "alpha/other/w.py",
                                    "alpha/sub/deeper/z.py", "alpha/sub/x.py", "alpha/sub/y.py"])
    # every directory's files form one contiguous run
    for folder in ("alpha/sub/", "alpha/sub/deeper/", "alpha/other/"):
        idx = [i for i, p in enumerate(paths) if p.startswith(folder)]
        assert idx == list(range(idx[0], idx[-1] + 1))


def test_order_is_seeded(tmp_path):
    root = make_site_packages(tmp_path / "site")
    orders = {tuple(f.path for f in build_documents([root], seed=s)[0][0].files) for s in range(8)}
    assert len(orders) > 1  # the seed shuffles directory order ...
    again = tuple(f.path for f in build_documents([root], seed=3)[0][0].files)
    assert again == tuple(f.path for f in build_documents([root], seed=3)[0][0].files)  # ... reproducibly


def test_custom_exclusion_and_checkout_root(tmp_path):
    root = make_site_packages(tmp_path / "site")
    checkout = tmp_path / "myrepo"
    (checkout / "src" / "mypkg").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname='mypkg'\n")
    (checkout / "src" / "mypkg" / "__init__.py").write_text("V = 2\n")
    docs, skipped = build_documents([root, checkout], exclude=["someone/single-module"])
    assert [d.name for d in docs] == ["Flask", "alpha", "pydantic", "myrepo"]
    assert skipped == ["single_module"]
    assert [f.path for f in docs[-1].files] == ["myrepo/src/mypkg/__init__.py"]


def test_manifest_and_refusal(tmp_path):
    root = make_site_packages(tmp_path / "site")
    docs, skipped = build_documents([root])
    (tmp_path / "manifest.json").write_text(json.dumps(corpus_manifest(docs, [str(root)], skipped, ["pallets/flask"])))
    on_disk = load_manifest(tmp_path / "manifest.json")
    by_name = {d["name"]: d for d in on_disk["documents"]}
    assert by_name["alpha"]["files"] == 6
    assert by_name["alpha"]["bytes"] == sum(len(f.text.encode()) for f in docs[0].files)
    assert on_disk["excluded"] == ["Flask", "pydantic"]

    trained_on = tmp_path / "checkouts" / "alpha-repo"
    (trained_on / "src" / "alpha").mkdir(parents=True)
    (trained_on / "src" / "alpha" / "__init__.py").write_text("")
    (trained_on / "tests").mkdir()
    (trained_on / "tests" / "__init__.py").write_text("")
    with pytest.raises(ValueError, match="alpha"):
        refuse_trained_on(trained_on, on_disk)
    fresh = tmp_path / "checkouts" / "flask"
    (fresh / "src" / "flask").mkdir(parents=True)
    (fresh / "src" / "flask" / "__init__.py").write_text("")
    refuse_trained_on(fresh, on_disk)  # excluded from training, so it may be evaluated


def test_corrupt_manifest_is_named(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(bad)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_manifest(tmp_path / "absent.json")


def test_normalize_name():
    assert normalize_name("pallets/flask") == normalize_name("Flask") == "flask"
    assert normalize_name("huggingface/evaluate") == "evaluate"
    assert normalize_name("pydantic-core") == normalize_name("pydantic_core")
