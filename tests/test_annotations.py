import logging
import pickle
from pathlib import Path

import pytest

from dataloaders.annotations import (
    SentenceRecord,
    VideoRecord,
    build_how2sign_records,
    load_split,
    read_annotation_pickle,
    split_dev_records,
)
from dataloaders.safe_pickle import UnsafePickleError


def write_pickle(path: Path, data: object) -> Path:
    with path.open("wb") as handle:
        pickle.dump(data, handle)
    return path


def video_names(records: list[SentenceRecord]) -> list[str]:
    return [video.name for record in records for video in record.videos]


@pytest.fixture(scope="module")
def h2s_test_pickle(shared_data: Path) -> dict:
    with (shared_data / "annotations" / "data_h2" / "test.pkl").open("rb") as handle:
        return pickle.load(handle)


@pytest.fixture(scope="module")
def h2s_csv_records(shared_data: Path) -> list[SentenceRecord]:
    return build_how2sign_records(shared_data / "annotations" / "data_h2" / "how2sign_realigned_test.csv")


# Real annotation files.

def test_phoenix_split_counts(shared_data: Path) -> None:
    data_path = shared_data / "annotations" / "data_ph"
    train = load_split("ph", data_path, "train")
    dev = load_split("ph", data_path, "dev")
    test = load_split("ph", data_path, "test")

    assert (len(train.records), train.num_videos, train.feature_subset) == (7096, 7096, "train")
    assert (len(dev.records), dev.num_videos, dev.feature_subset) == (519, 519, "dev")
    assert (len(test.records), test.num_videos, test.feature_subset) == (642, 642, "test")
    train_ids = {record.sentence_id for record in train.records}
    assert train_ids.isdisjoint(record.sentence_id for record in dev.records)
    assert train_ids.isdisjoint(record.sentence_id for record in test.records)


def test_phoenix_record_fields(shared_data: Path) -> None:
    path = shared_data / "annotations" / "data_ph" / "test.pkl"
    with path.open("rb") as handle:
        raw = pickle.load(handle)
    records = read_annotation_pickle(path)

    assert [record.sentence_id for record in records] == list(raw)
    first_key = next(iter(raw))
    assert records[0].text == raw[first_key]["text"]
    assert records[0].videos == [VideoRecord(raw[first_key]["video_name"], raw[first_key]["num_frames"])]


def test_csl_split_counts(shared_data: Path) -> None:
    data_path = shared_data / "annotations" / "data_csl"
    full_train = read_annotation_pickle(data_path / "train.pkl")
    assert (len(full_train), sum(len(r.videos) for r in full_train)) == (6598, 18401)

    train = load_split("csl", data_path, "train", seed=0)
    dev = load_split("csl", data_path, "dev", seed=0)
    test = load_split("csl", data_path, "test")
    assert (len(test.records), test.num_videos, test.feature_subset) == (798, 1176, "test")
    assert train.feature_subset == dev.feature_subset == "train"
    assert len(dev.records) == round(0.05 * 6598)
    assert len(train.records) + len(dev.records) == 6598
    assert train.num_videos + dev.num_videos == 18401


def test_csl_dev_slice_disjoint_and_fixed(shared_data: Path) -> None:
    data_path = shared_data / "annotations" / "data_csl"
    train_ids = [r.sentence_id for r in load_split("csl", data_path, "train", seed=3).records]
    dev_ids = [r.sentence_id for r in load_split("csl", data_path, "dev", seed=3).records]
    dev_again = [r.sentence_id for r in load_split("csl", data_path, "dev", seed=3).records]
    dev_other_seed = [r.sentence_id for r in load_split("csl", data_path, "dev", seed=4).records]

    assert set(train_ids).isdisjoint(dev_ids)
    assert dev_ids == dev_again
    assert dev_ids != dev_other_seed
    assert dev_ids == sorted(dev_ids)  # file order is kept, and the CSL ids are sorted in the file


def test_how2sign_test_counts(shared_data: Path) -> None:
    test = load_split("h2s", shared_data / "annotations" / "data_h2", "test")
    assert (len(test.records), test.num_videos, test.feature_subset) == (1969, 2348, "test")
    counts = [len(record.videos) for record in test.records]
    assert (counts.count(1), counts.count(2), counts.count(3)) == (1624, 311, 34)


def test_how2sign_csv_superset(h2s_csv_records: list[SentenceRecord]) -> None:
    assert len(h2s_csv_records) == 1977
    assert len(video_names(h2s_csv_records)) == 2357


def test_how2sign_csv_matches_pickle(h2s_csv_records: list[SentenceRecord], h2s_test_pickle: dict) -> None:
    expected = {}
    for sentence_id, entries in h2s_test_pickle.items():
        for entry in entries:
            expected[entry["video_name"]] = (sentence_id, entry["text"])
    built = {video.name: (record.sentence_id, record.text)
             for record in h2s_csv_records for video in record.videos}

    assert set(expected) <= set(built)
    mismatches = [name for name in expected if built[name] != expected[name]]
    assert mismatches == []


def test_how2sign_csv_order_matches_pickle(h2s_csv_records: list[SentenceRecord], h2s_test_pickle: dict) -> None:
    kept_videos = {entry["video_name"] for entries in h2s_test_pickle.values() for entry in entries}
    built_order = []
    for record in h2s_csv_records:
        videos = [video.name for video in record.videos if video.name in kept_videos]
        if videos:
            built_order.append((record.sentence_id, videos))
    pickle_order = [(key, [entry["video_name"] for entry in entries]) for key, entries in h2s_test_pickle.items()]
    assert built_order == pickle_order


def test_how2sign_csv_num_frames_from_fps(shared_data: Path, h2s_test_pickle: dict) -> None:
    csv_path = shared_data / "annotations" / "data_h2" / "how2sign_realigned_test.csv"
    records = build_how2sign_records(csv_path, fps={"-fZc293MpJk-1-rgb_front": 50.0})
    frames = {video.name: video.num_frames for record in records for video in record.videos}

    # The segment spans 0.26 s to 6.79 s: frames floor(13.0) = 13 to ceil(339.5) = 340 inclusive.
    assert frames["-fZc293MpJk-1-rgb_front_clip0"] == 340 - 13 + 1
    assert frames["-fZc293MpJk-1-rgb_front_clip0"] == h2s_test_pickle["-fZc293MpJk_0"][0]["num_frames"]
    assert frames["-g0iPSnQt6w-1-rgb_front_clip0"] is None


# Synthetic annotation files.

def test_read_list_layout(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "a.pkl", {
        "S2": [{"text": "Hello!", "video_name": "S2_P0", "num_frames": 5},
               {"text": "Hello!", "video_name": "S2_P1"}],
        "S1": [{"text": "Bye.", "video_name": "S1_P0", "num_frames": 7}],
    })
    records = read_annotation_pickle(path)
    assert records == [
        SentenceRecord("S2", "Hello!", [VideoRecord("S2_P0", 5), VideoRecord("S2_P1", None)]),
        SentenceRecord("S1", "Bye.", [VideoRecord("S1_P0", 7)]),
    ]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([1, 2], "expected a dict"),
        ({"S1": [{"video_name": "v"}]}, "'S1' has no 'text'"),
        ({"S1": {"text": "t"}}, "'S1' has no 'video_name'"),
        ({"S1": []}, "'S1' must be a dict or a non-empty list"),
        ({"S1": ["text"]}, "'S1' must be a dict"),
    ],
)
def test_read_invalid_structure(tmp_path: Path, data: object, fragment: str) -> None:
    path = write_pickle(tmp_path / "bad.pkl", data)
    with pytest.raises(ValueError, match=fragment) as error:
        read_annotation_pickle(path)
    assert str(path) in str(error.value)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        read_annotation_pickle(tmp_path / "missing.pkl")


def test_split_dev_records_sizes() -> None:
    records = [SentenceRecord(f"S{i}", f"text {i}", [VideoRecord(f"V{i}", None)]) for i in range(40)]
    train, dev = split_dev_records(records, 0.1, seed=0)
    assert (len(train), len(dev)) == (36, 4)
    train, dev = split_dev_records(records, 7, seed=0)
    assert (len(train), len(dev)) == (33, 7)
    assert {r.sentence_id for r in train} | {r.sentence_id for r in dev} == {r.sentence_id for r in records}

    for invalid in (0, -0.5, 2.5, 40, 41):
        with pytest.raises(ValueError, match="dev_size"):
            split_dev_records(records, invalid, seed=0)


def test_load_split_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="h2s, ph, csl, demo"):
        load_split("msrvtt", tmp_path, "train")
    with pytest.raises(ValueError, match="train, dev, test"):
        load_split("ph", tmp_path, "val")


def test_how2sign_train_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_split("h2s", tmp_path, "train")
    assert "train.pkl" in str(error.value)
    assert "how2sign_realigned_train.csv" in str(error.value)


def test_how2sign_train_from_csv(tmp_path: Path) -> None:
    header = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n"
    rows = [
        "v\tv-1-rgb_front\tv_1\tv_1-1-rgb_front\t5.0\t6.0\tSecond.\n",
        "v\tv-1-rgb_front\tv_0\tv_0-1-rgb_front\t1.0\t2.0\tFirst.\n",
        "v\tv-2-rgb_front\tv_0\tv_0-2-rgb_front\t0.5\t1.5\tFirst.\n",
    ] + [f"w\tw-1-rgb_front\tw_{i}\tw_{i}-1-rgb_front\t{i}.0\t{i}.5\tSentence {i}.\n" for i in range(17)]
    (tmp_path / "how2sign_realigned_train.csv").write_text(header + "".join(rows))

    train = load_split("h2s", tmp_path, "train", dev_size=2, seed=0)
    dev = load_split("h2s", tmp_path, "dev", dev_size=2, seed=0)
    records = {r.sentence_id: r for r in train.records + dev.records}
    assert len(records) == 19
    assert len(dev.records) == 2
    assert train.feature_subset == dev.feature_subset == "train"
    assert video_names([records["v_0"]]) == ["v-1-rgb_front_clip0", "v-2-rgb_front_clip0"]
    assert video_names([records["v_1"]]) == ["v-1-rgb_front_clip1"]
    assert records["v_0"].text == "First."


def test_demo_splits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for split, count in (("train", 3), ("dev", 2), ("test", 1)):
        write_pickle(tmp_path / f"{split}.pkl",
                     {f"{split}{i}": [{"text": f"t{i}", "video_name": f"{split}{i}_a"},
                                      {"text": f"t{i}", "video_name": f"{split}{i}_b"}] for i in range(count)})
    with caplog.at_level(logging.INFO, logger="dataloaders.annotations"):
        dev = load_split("demo", tmp_path, "dev")
    assert (len(dev.records), dev.num_videos, dev.feature_subset) == (2, 4, "dev")
    assert "demo dev: 2 sentences, 4 videos" in caplog.text
    assert load_split("demo", tmp_path, "test").feature_subset == "test"


class _RunsSubprocess:
    """Unpickling this object would start a subprocess that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import subprocess

        return subprocess.call, (["touch", str(self.marker)],)


def test_malicious_annotation_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = write_pickle(tmp_path / "train.pkl", {"S1": {"text": _RunsSubprocess(marker), "video_name": "v"}})
    with pytest.raises(UnsafePickleError) as error:
        read_annotation_pickle(path)
    assert str(path) in str(error.value)
    assert "subprocess.call" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", pickle.dumps({"S1": [{"text": "t"}]})[:15]])
def test_read_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "train.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable annotation pickle") as error:
        read_annotation_pickle(path)
    assert str(path) in str(error.value)


def test_load_split_names_source(tmp_path: Path) -> None:
    write_pickle(tmp_path / "train.pkl", {"S1": {"text": "t", "video_name": "v"}})
    assert load_split("demo", tmp_path, "train").source == str(tmp_path / "train.pkl")
