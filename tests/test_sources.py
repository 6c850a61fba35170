import numpy as np
import pytest
from PIL import Image

from fedct.data.decode import decode_image
from fedct.data.sources import check_files, read_dataset
from fedct.errors import FedctError


def _save(path, array, mode, fmt="PNG"):
    Image.fromarray(array, mode=mode).save(path, format=fmt)


def test_every_mode_decodes_to_one_grayscale_uint8(tmp_path):
    gray = (np.arange(32 * 48).reshape(32, 48) % 256).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((32, 48, 1), 255, np.uint8)], axis=-1)
    _save(tmp_path / "l.png", gray, "L")
    _save(tmp_path / "rgb.png", rgb, "RGB")
    _save(tmp_path / "rgba.png", rgba, "RGBA")
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "p.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    _save(tmp_path / "jpeg_named.png", rgb, "RGB", fmt="JPEG")  # JPEG data under a .png name
    expected = gray.astype(int)
    for name in ["l.png", "rgb.png", "rgba.png", "p.png", "16bit.png"]:
        out = decode_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (32, 48), name
        assert np.abs(out.astype(int) - expected).max() <= 1, name
    jpeg = decode_image(tmp_path / "jpeg_named.png")
    assert jpeg.shape == (32, 48) and np.abs(jpeg.astype(int) - expected).mean() < 8


def test_transparent_pixels_become_black(tmp_path):
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:4, :, 3] = 0
    _save(tmp_path / "a.png", rgba, "RGBA")
    out = decode_image(tmp_path / "a.png")
    assert out[:4].max() == 0 and out[4:].min() == 200


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(FedctError, match="bad.png"):
        decode_image(tmp_path / "bad.png")


def test_dicom_is_windowed_in_hounsfield_units(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x"), {}, file_meta=meta, preamble=b"\0" * 128)
    stored = np.array([[0, 424], [1174, 3000]], dtype=np.uint16)  # HU -1024, -600, 150, 1976
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    path = tmp_path / "slice_without_extension"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    out = decode_image(path, window=(-600, 1500))
    # lung window: -1350 HU -> 0, +150 HU -> 255; -600 HU sits in the middle
    assert out[0, 0] == round((1350 - 1024) / 1500 * 255)
    assert abs(int(out[0, 1]) - 128) <= 1
    assert out[1, 0] == 255 and out[1, 1] == 255


def test_image_folder_ignores_folders_without_images(synth_dir, tmp_path):
    dataset = read_dataset(synth_dir)
    assert dataset.classes == ["CT_COVID", "CT_NonCOVID"]
    assert dataset.positive == "CT_COVID"
    assert len(dataset.rows) == 160


def test_csv_reads_groups_sites_and_orders_classes_by_numeric_label(tmp_path, synth_dir):
    csv_path = tmp_path / "d.csv"
    lines = ["path,class,label,split"]
    for i, (name, num) in enumerate([("CT_COVID", 1), ("CT_NonCOVID", 0)] * 2):
        img = f"i{i}.png"
        _save(tmp_path / img, np.zeros((8, 8), np.uint8), "L")
        lines.append(f"{img},{name},{num},train")
    csv_path.write_text("\n".join(lines) + "\n")
    dataset = read_dataset(csv_path)
    assert dataset.classes == ["CT_NonCOVID", "CT_COVID"]
    assert dataset.positive == "CT_COVID"
    synth = read_dataset(synth_dir / "dataset.csv")
    assert {r.site for r in synth.rows} <= {"site0", "site1", "site2", "site3"}
    assert len({r.group for r in synth.rows}) == 40


def test_a_folder_row_labels_one_patients_slices_and_patient_labels_must_agree(tmp_path):
    """A CSV may label a patient instead of each slice: a row whose path is a folder of
    slices (DICOM series under it stay volumes), or a patient_label column over groups."""
    blank = np.zeros((8, 8), np.uint8)
    for patient, slices in (("p1", 3), ("p2", 2)):
        (tmp_path / "ct" / patient / "SR_2").mkdir(parents=True)
        for k in range(slices):
            _save(tmp_path / "ct" / patient / "SR_2" / f"IMG{k}.png", blank, "L")
    (tmp_path / "ct" / "p2" / "notes.txt").write_text("not an image")
    (tmp_path / "d.csv").write_text("path,label,site\nct/p1,COVID,a\nct/p2/,normal,b\n")
    rows = read_dataset(tmp_path / "d.csv").rows
    assert [(r.path, r.label, r.group, r.site) for r in rows] == [
        ("ct/p1/SR_2/IMG0.png", "COVID", "ct/p1", "a"), ("ct/p1/SR_2/IMG1.png", "COVID", "ct/p1", "a"),
        ("ct/p1/SR_2/IMG2.png", "COVID", "ct/p1", "a"), ("ct/p2/SR_2/IMG0.png", "normal", "ct/p2", "b"),
        ("ct/p2/SR_2/IMG1.png", "normal", "ct/p2", "b")]
    (tmp_path / "again.csv").write_text("path,label\nct/p1,COVID\nct/p1/SR_2/IMG1.png,COVID\n")
    with pytest.raises(FedctError, match=r"again.csv:3: path 'ct/p1/SR_2/IMG1.png' is listed again"):
        read_dataset(tmp_path / "again.csv")
    (tmp_path / "empty").mkdir()
    (tmp_path / "e.csv").write_text("path,label\nempty,COVID\n")
    with pytest.raises(FedctError, match=r"e.csv:2: folder 'empty' holds no image"):
        read_dataset(tmp_path / "e.csv")

    slices = [f"ct/p1/SR_2/IMG{k}.png" for k in range(3)]
    (tmp_path / "p.csv").write_text("path,group,patient_label\n" + "".join(
        f"{s},p1,COVID\n" for s in slices))
    assert {r.label for r in read_dataset(tmp_path / "p.csv").rows} == {"COVID"}
    (tmp_path / "p.csv").write_text("path,group,patient_label\n" + "".join(
        f"{s},p1,{'normal' if k == 2 else 'COVID'}\n" for k, s in enumerate(slices)))
    with pytest.raises(FedctError, match=r"p.csv: patient 'p1' is labelled 'COVID' "
                                         r"\(ct/p1/SR_2/IMG0.png\) and 'normal'"):
        read_dataset(tmp_path / "p.csv")
    by_name = read_dataset(tmp_path / "p.csv", group_pattern=r"IMG(\d)")  # 3 patients: agree
    assert len({r.group for r in by_name.rows}) == 3
    (tmp_path / "n.csv").write_text("path,patient_label\n" + "".join(f"{s},COVID\n" for s in slices))
    with pytest.raises(FedctError, match="nothing says which images are one patient's"):
        read_dataset(tmp_path / "n.csv")
    (tmp_path / "b.csv").write_text(f"path,label,patient_label\n{slices[0]},COVID,COVID\n")
    with pytest.raises(FedctError, match="'label' and 'patient_label' both given"):
        read_dataset(tmp_path / "b.csv")


def test_a_folder_row_keeps_a_dicom_series_under_it_as_one_volume(tmp_path):
    pytest.importorskip("pydicom")
    from fedct.data.series import write_series

    hounsfield = np.full((4, 16, 16), -800.0, np.float32)
    write_series(tmp_path / "p1" / "series", hounsfield, (1.0, 1.0, 2.0))
    _save(tmp_path / "p1" / "scout.png", np.zeros((8, 8), np.uint8), "L")
    (tmp_path / "d.csv").write_text("path,label\np1,COVID\n")
    rows = read_dataset(tmp_path / "d.csv").rows
    assert [(r.path, r.group) for r in rows] == [("p1/scout.png", "p1"), ("p1/series", "p1")]


def test_bad_files_stop_or_are_skipped(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _save(tmp_path / "a" / "ok.png", np.zeros((8, 8), np.uint8), "L")
    _save(tmp_path / "b" / "ok.png", np.zeros((8, 8), np.uint8), "L")
    (tmp_path / "b" / "broken.png").write_bytes(b"garbage")
    dataset = read_dataset(tmp_path)
    with pytest.raises(FedctError, match="broken.png"):
        check_files(dataset, skip_bad=False)
    kept = check_files(dataset, skip_bad=True)
    assert len(kept.rows) == 2 and "broken.png" in kept.skipped[0]


def test_group_pattern_and_missing_columns(tmp_path, synth_dir):
    dataset = read_dataset(synth_dir, group_pattern=r"^(p\d+)_")
    assert len({r.group for r in dataset.rows}) == 40
    (tmp_path / "x.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(FedctError, match="missing column 'path'"):
        read_dataset(tmp_path / "x.csv")


def test_group_pattern_alternatives_give_the_first_group_that_matched(tmp_path):
    pattern = r"^(\d{4}\.\d{2}\.\d{2}\.\d+)-p|^(\d+)%|^(.+)\."
    names = {"2020.03.07.20031393-p7-50%2.png": "2020.03.07.20031393", "76%1.jpg": "76",
             "102.png": "102"}
    (tmp_path / "d.csv").write_text("path,label\n" + "".join(f"{n},x\n" for n in names))
    rows = read_dataset(tmp_path / "d.csv", group_pattern=pattern).rows
    assert {r.path: r.group for r in rows} == names


@pytest.mark.slow
def test_covid_ct_papers_stay_in_one_client_with_the_readme_pattern(tmp_path):
    from collections import defaultdict

    from conftest import COVID_CSV, require_shared

    from fedct.data.manifest import SplitOptions, run_split

    require_shared(COVID_CSV)
    _, meta = run_split(COVID_CSV, tmp_path / "s", SplitOptions(keep_split=True, scheme="dirichlet",
                                                               alpha=0.5, clients=5, seed=1),
                        group_pattern=r"^(\d{4}\.\d{2}\.\d{2}\.\d+)-p|^(\d+)%|^(.+)\.")
    assert "warnings" not in meta
    clients = defaultdict(set)
    for line in (tmp_path / "s" / "manifest.csv").read_text().splitlines()[1:]:
        path, label, group, site, split, client = line.split(",")
        if split == "train" and label == "CT_COVID":
            clients[group].add(client)
    assert len(clients) >= 30 and all(len(c) == 1 for c in clients.values())
