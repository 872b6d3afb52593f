"""The brick catalog: list / show / search bricks under run directories, assemble by class names or ids, refusals."""

import json
import shutil

import pytest
import torch
from torch import nn

import kbricks
from kbricks.cli import main
from kbricks.errors import CheckpointError
from kbricks.methods.kf.bricks import BrickMismatchError, signature
from kbricks.methods.kf.catalog import choose, describe, scan

NAMES = ["cat", "dog", "bird", "frog", "ship", "car"]


def _data(n=240):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 6
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    x[torch.arange(n), 0, y, y] += 1.0  # one bright pixel per class
    return x, y


def _factorize(run_dir, tasks, seed):
    x, y = _data()
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 6)).eval()
    return kbricks.factorize(teacher, (x, y), classes=NAMES, tasks=tasks, epochs=1, batch_size=64, seed=seed, run_dir=run_dir,
                             progress="off", ckn={"name": "mlp", "kwargs": {"hidden": [16]}}, tsn={"name": "mlp", "kwargs": {"hidden": [8]}},
                             options={"tsn_dim": 4})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two factorizations of one 6-class problem (two CKNs): run a with pairs of classes, run b with halves."""
    root = tmp_path_factory.mktemp("store")
    a = _factorize(root / "a", [[0, 1], [2, 3], [4, 5]], seed=0)
    b = _factorize(root / "b", [[0, 1, 2], [3, 4, 5]], seed=1)
    return root, a, b


def test_list_describes_every_brick_and_ignores_other_json(store):
    root, a, b = store
    cat = scan(root)
    assert not cat.refused
    assert len(cat.ckns) == 2 and len(cat.bricks) == 2 + 3 + 2  # model.json, results.json ... are not bricks
    ckn_a = json.loads(a.bricks["ckn"].read_text())["fingerprint"]
    tsns = cat.tsns_of(ckn_a)
    assert sorted(t.task for t in tsns) == ["classes_0-1", "classes_2-3", "classes_4-5"]
    t = next(t for t in tsns if t.task == "classes_2-3")
    assert t.classes == (2, 3) and t.class_names == ("bird", "frog") and t.labels == ["2:bird", "3:frog"]
    assert t.ckn == ckn_a and t.path == a.bricks["classes_2-3"]
    assert t.architecture["name"] == "mlp" and t.ckn_architecture["name"] == "mlp" and t.input_shape == [1, 8, 8]
    # parameters: the TSN's weights, counted from the file
    assert t.parameters == sum(v.numel() for v in kbricks.load_brick(t.path)[1].values())
    manifest = json.loads(t.path.read_text())
    assert t.accuracy == pytest.approx(manifest["metrics"]["acc"]) and t.normalize == manifest["normalize"]
    assert describe(t.path.with_suffix("")) == t  # one brick, named with or without .json
    d = t.to_dict()
    assert d["classes"] == [{"id": 2, "name": "bird"}, {"id": 3, "name": "frog"}] and d["ckn_fingerprint"] == ckn_a


def test_search_by_names_ids_ckn_and_task(store):
    root, a, b = store
    cat = scan([root / "a", root / "b"])
    found = {(m.brick.task, tuple(m.classes)) for m in cat.search(classes=["cat", 4])}
    assert found == {("classes_0-1", ("cat",)), ("classes_4-5", ("4",)), ("classes_0-1-2", ("cat",)), ("classes_3-4-5", ("4",))}
    ckn_b = json.loads(b.bricks["ckn"].read_text())["fingerprint"]
    only_b = cat.search(classes="frog", ckn=ckn_b[:6])
    assert [m.brick.task for m in only_b] == ["classes_3-4-5"]
    assert {m.brick.kind for m in cat.search(ckn=ckn_b)} == {"ckn", "tsn"} and len(cat.search(ckn=ckn_b)) == 3
    assert [m.brick.task for m in cat.search(task="classes_?-5")] == ["classes_4-5"]
    assert cat.search(classes=["zebra", 99]) == []  # nothing found: an empty list, not an error


def test_choose_prefers_fewest_bricks_and_assembles_like_the_factors(store):
    root, a, b = store
    x, _ = _data(48)
    sel = choose(root, ["cat", "dog", "bird"])  # b holds them in one brick, a needs two
    assert sel.ckn.path == b.bricks["ckn"] and [t.task for t in sel.tsns] == ["classes_0-1-2"]
    assert sel.requested == {"cat": 0, "dog": 1, "bird": 2}
    net = kbricks.assemble(store=root, classes="cat,dog,bird")
    assert net.selection == sel and net.classes == [0, 1, 2]
    with torch.no_grad():
        assert torch.equal(net(x), b.assemble(["classes_0-1-2"])(x))
    # every class: exactly the run's own assembly of all its bricks, i.e. the factors' union prediction (which the
    # run computes on inputs normalised by its own transform: equal up to float rounding)
    full = kbricks.assemble(store=[root / "a"], classes=NAMES)
    assert [t.task for t in full.selection.tsns] == ["classes_0-1", "classes_2-3", "classes_4-5"]
    with torch.no_grad():
        assert torch.equal(full(x), a.assemble()(x))
        assert torch.allclose(full(x), a.predict(x), atol=1e-5)
    # the choice is deterministic: the same store and classes give the same bricks
    assert choose(root, ["frog", "cat"]) == choose(root, ["frog", "cat"])


def test_uncovered_classes_are_named_in_one_line(store, tmp_path):
    root, a, b = store
    mixed = tmp_path / "mixed"  # a's CKN with its cat/dog brick, b's CKN with its frog/ship/car brick
    for run, names in ((a, ["ckn", "classes_0-1"]), (b, ["ckn", "classes_3-4-5"])):
        dest = mixed / run.run_dir.name
        dest.mkdir(parents=True)
        for n in names:
            for suffix in (".json", ".safetensors"):
                shutil.copy(run.bricks[n].with_suffix(suffix), dest / run.bricks[n].with_suffix(suffix).name)
    with pytest.raises(BrickMismatchError) as err:
        kbricks.assemble(store=mixed, classes=["cat", "frog", "zebra"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("no compatible brick covers frog, zebra (closest: CKN ")
    assert "whose bricks cover cat" in msg
    # bricks of another CKN still do not mix when named by hand
    with pytest.raises(BrickMismatchError, match="bricks only assemble with the CKN they were factorized with"):
        kbricks.assemble(mixed / "a/ckn.json", [mixed / "b/tsn-classes_3-4-5.json"])
    with pytest.raises(BrickMismatchError, match="no CKN brick in"):
        choose([mixed / "a/tsn-classes_0-1.json"], ["cat"])


def test_corrupt_and_edited_manifests_are_listed_as_refused(store, tmp_path):
    root, a, b = store
    bad = tmp_path / "bricks"
    shutil.copytree(a.run_dir / "bricks", bad)
    (bad / "tsn-broken.json").write_text("{not json")
    m = json.loads((bad / "tsn-classes_0-1.json").read_text())
    (bad / "tsn-classes_0-1.json").write_text(json.dumps(dict(m, class_names=["dog", "cat"])))  # swapped names
    cat = scan(bad)
    reasons = {r.path.name: r.reason for r in cat.refused}
    assert set(reasons) == {"tsn-broken.json", "tsn-classes_0-1.json"}
    assert "not a readable JSON document" in reasons["tsn-broken.json"]
    assert "'class_names'" in reasons["tsn-classes_0-1.json"] and "modified after export" in reasons["tsn-classes_0-1.json"]
    assert sorted(t.task for t in cat.bricks if t.kind == "tsn") == ["classes_2-3", "classes_4-5"]
    with pytest.raises(BrickMismatchError, match=r"no compatible brick covers cat .*2 manifest\(s\) in the store were refused"):
        choose(bad, ["cat", "bird"])
    # a properly signed manifest with a malformed field is refused too, in one line
    m2 = json.loads((bad / "tsn-classes_2-3.json").read_text())
    m2["class_names"] = 5
    m2["fingerprint"] = signature(m2["weights_fingerprint"], m2)
    m2.pop("claim_digests")
    (bad / "tsn-classes_2-3.json").write_text(json.dumps(m2))
    refused = {r.path.name: r.reason for r in scan(bad).refused}
    assert "malformed manifest (TypeError" in refused["tsn-classes_2-3.json"]
    with pytest.raises(CheckpointError, match="not a readable JSON|not a JSON document"):
        describe(bad / "tsn-broken.json")


def test_cli_list_show_search_and_assemble(store, tmp_path, capsys):
    root, a, b = store
    assert main(["bricks", "list", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("CKN ") == 2 and out.count("  TSN ") == 5 and "0:cat 1:dog 2:bird" in out
    assert main(["bricks", "list", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["bricks"]) == 7 and listed["refused"] == []
    assert main(["bricks", "show", str(a.bricks["classes_4-5"])]) == 0
    shown = capsys.readouterr().out
    assert "classes:" in shown and "4:ship 5:car" in shown and "verified" in shown
    assert main(["bricks", "show", str(a.bricks["classes_4-5"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "classes_4-5"
    (tmp_path / "tsn-bad.json").write_text("{")
    assert main(["bricks", "show", str(tmp_path / "tsn-bad.json")]) == 2
    assert "is not a JSON document" in capsys.readouterr().err
    assert main(["bricks", "search", str(root), "--classes", "car", "--task", "classes_4*", "--json"]) == 0
    assert [m["task"] for m in json.loads(capsys.readouterr().out)["matches"]] == ["classes_4-5"]
    # a search that finds nothing: one line on stderr, exit 1 (like grep); errors stay exit 2
    assert main(["bricks", "search", str(root), "--classes", "zebra"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().count("\n") == 0 and "no brick under" in captured.err
    assert main(["bricks", "search", str(root)]) == 2
    assert "search needs --classes, --ckn or --task" in capsys.readouterr().err
    assert main(["bricks", "list", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # assemble by classes from the store, written and loadable
    assert main(["assemble", "--store", str(root / "a"), str(root / "b"), "--classes", "cat,dog,bird", "--out", str(tmp_path / "asm")]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["tasks"] == ["classes_0-1-2"] and result["class_names"][:3] == ["cat", "dog", "bird"]
    assert result["chosen"]["ckn"]["path"] == str(b.bricks["ckn"]) and "kbricks: chose CKN" in captured.err
    x, _ = _data(24)
    with torch.no_grad():
        assert torch.equal(kbricks.load_assembled(tmp_path / "asm")(x), b.assemble(["classes_0-1-2"])(x))
    assert main(["assemble", "--store", str(root / "a"), "--classes", "cat,zebra"]) == 2
    assert "no compatible brick covers zebra" in capsys.readouterr().err
    assert main(["assemble", str(a.bricks["ckn"]), "--store", str(root), "--classes", "cat"]) == 2
    assert "not both" in capsys.readouterr().err


def test_assemble_by_classes_takes_a_later_brick_that_grows_the_label_space(tmp_path):
    """A CKN factorized on classes 0-3, then extended with classes 4-5 (kf_extend): the old and the new bricks assemble
    by class names, over the larger label space, exactly as the same bricks named by hand."""
    x, y = _data()
    low = y < 4
    torch.manual_seed(0)
    old_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    new_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()  # outputs: the global classes 4 and 5
    small = {"ckn": {"name": "mlp", "kwargs": {"hidden": [16]}}, "options": {"tsn_dim": 4}}
    tsn = {"name": "mlp", "kwargs": {"hidden": [8]}}
    old = kbricks.factorize(old_teacher, (x[low], y[low]), classes=NAMES[:4], tasks=[[0, 1], [2, 3]], epochs=1, tsn=tsn,
                            run_dir=tmp_path / "store/old", progress="off", **small)
    new = kbricks.extend(old.bricks["ckn"], new_teacher, (x, y), teacher_classes=[4, 5], tasks=[[4, 5]], classes=NAMES, epochs=1,
                         tsn=tsn, options={"tsn_dim": 4}, run_dir=tmp_path / "store/new", progress="off")
    cat = scan(tmp_path / "store")
    assert not cat.refused
    grown = next(t for t in cat.bricks if t.task == "classes_4-5")
    assert grown.num_classes_total == 6 and cat.ckns[0].num_classes_total == 4 and grown.labels == ["4:ship", "5:car"]

    sel = choose(tmp_path / "store", ["dog", "car"])
    assert [t.task for t in sel.tsns] == ["classes_0-1", "classes_4-5"] and sel.requested == {"dog": 1, "car": 5}
    net = kbricks.assemble(store=tmp_path / "store", classes=["dog", "car", "frog"])
    assert [t.task for t in net.selection.tsns] == ["classes_0-1", "classes_2-3", "classes_4-5"]
    assert net.classes == [0, 1, 2, 3, 4, 5] and net.info["class_names"] == NAMES
    by_hand = kbricks.assemble(old.bricks["ckn"], [old.bricks["classes_0-1"], old.bricks["classes_2-3"], new.bricks["classes_4-5"]])
    assert torch.equal(net(x), by_hand(x))
    assert [m.brick.task for m in cat.search(classes=["car"])] == ["classes_4-5"]

    # a later brick that gives a class name another id: asking by that name is ambiguous, in one line; ids still work
    other_names = ["x0", "x1", "x2", "x3", "cat", "car"]
    kbricks.extend(old.bricks["ckn"], new_teacher, (x, y), teacher_classes=[4, 5], tasks=[[4, 5]], classes=other_names, epochs=1,
                   tsn=tsn, options={"tsn_dim": 4}, run_dir=tmp_path / "store/renamed", progress="off")
    with pytest.raises(BrickMismatchError, match=r"class name 'cat' names classes \[0, 4\] .*ask for it by id"):
        choose(tmp_path / "store", ["cat"])
    assert choose(tmp_path / "store", ["0", "dog"]).requested == {"0": 0, "dog": 1}


@pytest.fixture(scope="module")
def two_meanings(tmp_path_factory):
    """One CKN whose ids 4 and 5 carry two meanings: its own bricks call them ship/car, bricks extended later with a
    teacher on other data of the same input shape (kf_extend) call them boot/bag."""
    root = tmp_path_factory.mktemp("meanings")
    x, y = _data()
    run = _factorize(root / "own", [[0, 1], [2, 3], [4, 5]], seed=0)
    torch.manual_seed(3)
    other_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()  # outputs: the global classes 4 and 5
    other = kbricks.extend(run.bricks["ckn"], other_teacher, (x, y), teacher_classes=[4, 5], tasks=[[4, 5]],
                           classes=NAMES[:4] + ["boot", "bag"], epochs=1, tsn={"name": "mlp", "kwargs": {"hidden": [8]}},
                           options={"tsn_dim": 4}, run_dir=root / "other", progress="off")
    return root, run, other


def test_a_class_asked_by_name_only_takes_bricks_that_give_its_id_that_name(two_meanings):
    root, run, other = two_meanings
    cat = scan(root)
    assert sorted(t.labels for t in cat.bricks if t.task == "classes_4-5") == [["4:boot", "5:bag"], ["4:ship", "5:car"]]
    # whichever brick sorts or scores first, the name decides: boot is the extended brick, car the CKN's own
    for store in (root, [root / "other", root / "own"], [root / "own", root / "other"]):
        assert [t.path for t in choose(store, ["boot"]).tsns] == [other.bricks["classes_4-5"]]
        assert [t.path for t in choose(store, ["car", "cat"]).tsns] == [run.bricks["classes_0-1"], run.bricks["classes_4-5"]]
    assert [(m.brick.path, m.classes) for m in cat.search(classes=["bag"])] == [(other.bricks["classes_4-5"], ["bag"])]
    assert [m.brick.path for m in cat.search(classes=["ship"])] == [run.bricks["classes_4-5"]]
    net = kbricks.assemble(store=root, classes="bag,dog")
    assert net.info["class_names"][4:] == ["boot", "bag"] and net.selection.requested == {"bag": 5, "dog": 1}
    # id:name (the form the listing prints) picks one meaning too
    assert [t.path for t in choose(root, ["5:bag"]).tsns] == [other.bricks["classes_4-5"]]
    # two meanings of one id cannot both be in one network: refused, never one of them silently
    with pytest.raises(BrickMismatchError, match="overlapping class sets"):
        choose(root, ["ship", "boot"])


def test_an_id_with_two_meanings_is_refused_in_one_line(two_meanings, capsys):
    root, run, other = two_meanings
    for ask in (["4"], [5, "cat"]):
        with pytest.raises(BrickMismatchError) as err:
            choose(root, ask)
        msg = str(err.value)
        assert "\n" not in msg and "by the bricks of CKN" in msg and "ask for it by name or as id:name" in msg
    assert "class id 4 is named 'boot' and 'ship'" in str(pytest.raises(BrickMismatchError, scan(root).search, classes=["4"]).value)
    # ids that only one meaning names still resolve
    assert choose(root, ["0", "3"]).requested == {"0": 0, "3": 3}
    assert main(["assemble", "--store", str(root), "--classes", "5"]) == 2
    assert "class id 5 is named 'bag' and 'car'" in capsys.readouterr().err


def test_hand_named_bricks_with_two_meanings_of_one_id_are_refused(two_meanings):
    root, run, other = two_meanings
    with pytest.raises(BrickMismatchError, match=r"repeats .*classes \[4, 5\] \(named 'boot', 'bag' there, 'ship', 'car' in an earlier brick"):
        kbricks.assemble(run.bricks["ckn"], [run.bricks["classes_4-5"], other.bricks["classes_4-5"]])
