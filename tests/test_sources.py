"""Annotation formats (tubevit_fast/app/sources.py) on files the tests write, and their bad inputs."""
import json
import os

import pytest

from tubevit_fast.app.sources import check_files, infer_format, load_annotations, load_images, merge_label_spaces


def touch(*paths):
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ---- folder ------------------------------------------------------------------------------------

def test_folder_classes_sorted_and_labels(tmp_path):
    touch(tmp_path / "zebra/b.mp4", tmp_path / "zebra/a.avi", tmp_path / "ant/c.png", tmp_path / "ant/notes.txt",
          tmp_path / "ant/._c.png", tmp_path / ".ipynb_checkpoints/x.mp4")
    ann = load_annotations(tmp_path)
    assert ann.classes == ["ant", "zebra"]
    assert ann.samples == [(str(tmp_path / "ant/c.png"), 0), (str(tmp_path / "zebra/a.avi"), 1),
                           (str(tmp_path / "zebra/b.mp4"), 1)]
    assert infer_format(tmp_path) == "folder"


def test_folder_refuses_an_empty_class_folder_naming_it(tmp_path):
    touch(tmp_path / "cat/a.mp4", tmp_path / "dog/readme.txt")
    with pytest.raises(ValueError, match=r"dog: empty class folder"):
        load_annotations(tmp_path)
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_annotations(tmp_path / "cat")


def test_folder_with_forced_classes(tmp_path):
    touch(tmp_path / "b/x.mp4")
    assert load_annotations(tmp_path, classes=["a", "b"]).samples == [(str(tmp_path / "b/x.mp4"), 1)]
    touch(tmp_path / "c/y.mp4")
    with pytest.raises(ValueError, match=r"class 'c' is not one of the 2 classes"):
        load_annotations(tmp_path, classes=["a", "b"])


# ---- list --------------------------------------------------------------------------------------

def test_list_space_separated_integer_labels_named_after_folders(tmp_path):
    data = write(tmp_path / "train.txt", "# a comment\nrun/v1.avi 1\n\njump/v2.avi 0\nrun/v3.avi 1\n")
    ann = load_annotations(data, root="/data/ucf")
    assert ann.samples == [("/data/ucf/run/v1.avi", 1), ("/data/ucf/jump/v2.avi", 0), ("/data/ucf/run/v3.avi", 1)]
    assert ann.classes == ["jump", "run"]
    assert infer_format(data) == "list"


def test_list_csv_with_header_and_class_names_root_defaults_to_list_folder(tmp_path):
    data = write(tmp_path / "val.csv", "path,label\nclips/a b.mp4,walk\nclips/c.mp4,sit\n")
    ann = load_annotations(data)
    assert ann.classes == ["sit", "walk"]
    assert ann.samples == [(str(tmp_path / "clips/a b.mp4"), 1), (str(tmp_path / "clips/c.mp4"), 0)]
    assert infer_format(data) == "list"


def test_list_integer_labels_without_consistent_folders_are_numbered(tmp_path):
    ann = load_annotations(write(tmp_path / "l.txt", "x/1.mp4 0\nx/2.mp4 1\n"))
    assert ann.classes == ["0", "1"]


def test_list_path_only_lines_take_the_folder_as_class(tmp_path):
    data = write(tmp_path / "testlist.txt", "Run/v_Run_g01.avi\nJump/v_Jump_g01.avi\n")
    ann = load_annotations(data, root=tmp_path, classes=["Jump", "Run", "Swim"])
    assert [label for _, label in ann.samples] == [1, 0] and ann.classes == ["Jump", "Run", "Swim"]


@pytest.mark.parametrize("text, message", [
    ("a.mp4 1\nb.mp4 2\n", r"0-based class numbers, but 1 of 0..2 have no item \(0\)"),
    ("a.mp4 0\nb.mp4 run\n", r"l.txt:2: labels mix integers and class names"),
    ("a.mp4,0,extra\n", r"l.txt:1: expected 'path label' or 'path,label'"),
    ("a.mp4 -1\n", r"l.txt:1: label -1 out of range"),
    ("\n# nothing\n", r"holds no items"),
])
def test_list_bad_inputs(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_annotations(write(tmp_path / "l.txt", text))


def test_list_against_forced_classes(tmp_path):
    with pytest.raises(ValueError, match=r"l.txt:1: label 3 out of range \(there are 2 classes\)"):
        load_annotations(write(tmp_path / "l.txt", "a.mp4 3\n"), classes=["x", "y"])
    with pytest.raises(ValueError, match=r"l.txt:2: class 'z' is not one of the 2 classes"):
        load_annotations(write(tmp_path / "l.txt", "a.mp4 y\nb.mp4 z\n"), classes=["x", "y"])


# ---- kinetics ----------------------------------------------------------------------------------

def test_kinetics_csv_file_names_and_sorted_classes(tmp_path):
    data = write(tmp_path / "train.csv", "youtube_id,label,time_start,time_end,split\n"
                                         "abc-_1,zumba,7,17,train\n\"q,1\",\"abseiling, up\",120,130,train\n")
    ann = load_annotations(data, root="/k400/train")
    assert infer_format(data) == "kinetics"
    assert ann.classes == ["abseiling, up", "zumba"]
    assert ann.samples == [("/k400/train/abc-_1_000007_000017.mp4", 1), ("/k400/train/q,1_000120_000130.mp4", 0)]
    val = write(tmp_path / "val.csv", "label,youtube_id,time_start,time_end,split\nzumba,x,0,10,val\n")
    assert load_annotations(val, classes=ann.classes).samples == [(str(tmp_path / "x_000000_000010.mp4"), 1)]


@pytest.mark.parametrize("text, message", [
    ("label,youtube_id,time_start,split\nx,y,1,train\n", r"needs the columns .*missing time_end"),
    ("label,youtube_id,time_start,time_end,split\nx,y,one,2,train\n", r"train.csv:2: expected .*integer times"),
    ("label,youtube_id,time_start,time_end,split\n,y,1,2,test\n", r"train.csv:2: no label or youtube_id"),
])
def test_kinetics_bad_inputs(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_annotations(write(tmp_path / "train.csv", text), format="kinetics")


# ---- something-something v2 --------------------------------------------------------------------

def test_ssv2_templates_map_to_labels_json(tmp_path):
    write(tmp_path / "labels.json", json.dumps({"Pushing something from left to right": "1",
                                                "Holding something next to something": "0"}))
    entries = [{"id": "78687", "label": "holding potato next to vicks vaporub bottle",
                "template": "Holding [something] next to [something]", "placeholders": ["potato", "bottle"]},
               {"id": "42326", "template": "Pushing [something] from left to right"}]
    data = write(tmp_path / "something-something-v2-train.json", json.dumps(entries))
    ann = load_annotations(data, root="/ssv2/videos")
    assert infer_format(data) == "ssv2"
    assert ann.classes == ["Holding something next to something", "Pushing something from left to right"]
    assert ann.samples == [("/ssv2/videos/78687.webm", 0), ("/ssv2/videos/42326.webm", 1)]


@pytest.mark.parametrize("labels, entries, message", [
    (None, [], r"needs labels.json beside it"),
    ({"A": "0"}, [{"id": "1"}], r"entry 0 has no id or template"),
    ({"A": "0"}, [{"id": "1", "template": "[B]"}], r"entry 0: class 'B' is not one of the 1 classes"),
    ({"A": "1"}, [], r"ids must be 0..0"),
    ({"A": "zero"}, [], r"integer ids"),
    ({"A": "0"}, {"id": "1"}, r"expected a JSON list"),
])
def test_ssv2_bad_inputs(tmp_path, labels, entries, message):
    if labels is not None:
        write(tmp_path / "labels.json", json.dumps(labels))
    with pytest.raises(ValueError, match=message):
        load_annotations(write(tmp_path / "train.json", json.dumps(entries)))


def test_ssv2_invalid_json(tmp_path):
    write(tmp_path / "labels.json", "{not json")
    with pytest.raises(ValueError, match=r"labels.json: not valid JSON"):
        load_annotations(write(tmp_path / "train.json", "[]"))


# ---- shared ------------------------------------------------------------------------------------

def test_check_files_lists_the_first_missing_and_counts_them(tmp_path):
    lines = "".join(f"c/{i}.mp4 c\n" for i in range(8))
    touch(tmp_path / "c/3.mp4")
    ann = load_annotations(write(tmp_path / "l.txt", lines))
    with pytest.raises(ValueError) as err:
        check_files(ann, "--val-data")
    message = str(err.value)
    assert message.startswith("--val-data: 7 of 8 files are missing: ") and message.endswith(", ...")
    assert [os.path.basename(p) for p in message.split(": ", 2)[2].split(", ")[:5]] == \
        ["0.mp4", "1.mp4", "2.mp4", "4.mp4", "5.mp4"]
    assert "\n" not in message
    for i in range(8):
        touch(tmp_path / f"c/{i}.mp4")
    check_files(ann)


@pytest.mark.parametrize("name", ["l.txt", "k.csv", "s.json"])
def test_binary_annotation_file(tmp_path, name):
    (tmp_path / name).write_bytes(bytes(range(128, 256)) * 4)
    write(tmp_path / "labels.json", "{}")
    with pytest.raises(ValueError, match=rf"{name}: not (a text file|valid JSON)"):
        load_annotations(tmp_path / name)


def test_bad_format_and_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_annotations(tmp_path, format="csv")
    with pytest.raises(ValueError, match="no such file or folder"):
        load_annotations(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="no such kinetics annotation file"):
        load_annotations(tmp_path, format="kinetics")


def test_merge_label_spaces_shares_common_names(tmp_path):
    videos = load_annotations(write(tmp_path / "v.txt", "a.mp4 dog\nb.mp4 run\n"))
    images = load_annotations(write(tmp_path / "i.txt", "a.png dog\nb.png cat\n"))
    v, i = merge_label_spaces(videos, images)
    assert v.classes == i.classes == ["dog", "run", "cat"]
    assert [label for _, label in i.samples] == [0, 2] and v.samples == videos.samples


def test_load_images_from_a_folder_or_a_list(tmp_path):
    touch(tmp_path / "imgs/dog/a.jpg", tmp_path / "imgs/dog/clip.mp4", tmp_path / "imgs/cat/b.PNG")
    ann = load_images(tmp_path / "imgs")
    assert ann.classes == ["cat", "dog"]
    assert ann.samples == [(str(tmp_path / "imgs/cat/b.PNG"), 0), (str(tmp_path / "imgs/dog/a.jpg"), 1)]
    listed = load_images(write(tmp_path / "imgs.txt", "imgs/dog/a.jpg dog\n"))
    assert listed.samples == [(str(tmp_path / "imgs/dog/a.jpg"), 0)]
    with pytest.raises(ValueError, match=r"imgs2.txt: .*clip.mp4 is not an image"):
        load_images(write(tmp_path / "imgs2.txt", "imgs/dog/a.jpg dog\nimgs/dog/clip.mp4 dog\n"))
    with pytest.raises(ValueError, match="not the kinetics format"):
        load_images(tmp_path / "imgs", format="kinetics")
    touch(tmp_path / "imgs/fish/c.mp4")
    with pytest.raises(ValueError, match=r"fish: empty class folder \(no .png .jpg .jpeg files\)"):
        load_images(tmp_path / "imgs")
