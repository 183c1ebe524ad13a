import pytest

from winclip.prompting import build_ensemble, default_lists, defect_state


def test_default_counts_and_placeholders():
    lists = default_lists()
    assert len(lists["normal_states"]) == 7 and len(lists["anomalous_states"]) == 4
    assert len(lists["templates"]) == 22
    for entry in lists["normal_states"] + lists["anomalous_states"] + lists["templates"]:
        assert entry.count("{}") == 1
    assert len(set(lists["templates"])) == 22


def test_default_ensemble():
    e = build_ensemble("bottle")
    assert len(e.normal) == 7 * 22 and len(e.anomalous) == 4 * 22
    assert len(set(e.normal)) == len(e.normal) and len(set(e.anomalous)) == len(e.anomalous)
    assert e.normal[0] == "a cropped photo of the bottle."
    assert "a photo of the damaged bottle for anomaly detection." in e.anomalous
    assert "a photo of a bottle without defect." in e.normal
    assert not any("{" in p for p in e.normal + e.anomalous)


def test_empty_name_defaults_to_object():
    assert build_ensemble("   ").normal[0] == "a cropped photo of the object."


def test_defect_words_become_anomalous_states():
    assert defect_state("crack") == "{} with crack"
    assert defect_state("bad soldering {}") == "bad soldering {}"
    e = build_ensemble("pcb", ["crack", "bad soldering {}", "crack", " "])
    assert len(e.anomalous) == (4 + 2) * 22  # duplicate and blank dropped
    assert "a photo of a pcb with crack." in e.anomalous
    assert "a photo of a bad soldering pcb." in e.anomalous


def test_braces_in_user_text_do_not_break_formatting():
    e = build_ensemble("part {x} {}", ["{0} dent"])
    assert "a photo of a part {x} {}." in e.normal
    assert any("{0} dent" in p for p in e.anomalous)


def test_custom_lists_replace_defaults():
    e = build_ensemble("cap", normal_states=["good {}"], anomalous_states=["bad {}"], templates=["{}", "a {}"])
    assert e.normal == ("good cap", "a good cap") and e.anomalous == ("bad cap", "a bad cap")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"templates": ["no placeholder"]}, "placeholder"),
        ({"normal_states": []}, "empty"),
        ({"object_name": "x" * 500}, "characters"),
        ({"defect_words": ["a {} b {}"]}, "at most once"),
        ({"defect_words": [f"d{i}" for i in range(40)]}, "at most 32"),
    ],
)
def test_bad_prompt_input_is_rejected_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_ensemble(**kwargs)
