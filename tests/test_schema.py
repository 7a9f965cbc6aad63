import pytest

from manifests.schema import EMOTIONS, SENTENCES, parse_clip_name


def test_parses_every_field():
    name = parse_clip_name("1076_MTI_NEU_XX")
    assert (name.actor, name.sentence, name.emotion, name.level) == (1076, "MTI", "NEU", "XX")
    assert name.clip_id == "1076_MTI_NEU_XX"
    assert name.label == EMOTIONS.index("NEU") == 4


@pytest.mark.parametrize(
    "stem, field",
    [
        ("1000_DFA_ANG_XX", "actor"),      # below 1001
        ("1092_DFA_ANG_XX", "actor"),      # above 1091
        ("1001_XYZ_ANG_XX", "sentence"),
        ("1001_DFA_JOY_XX", "emotion"),
        ("1001_DFA_ANG_ZZ", "level"),
        ("1001_DFA_ANG", "follow"),        # missing field
        ("notes", "follow"),
        ("1001_DFA_ANG_XX.flv", "follow"),  # extension must be stripped first
    ],
)
def test_rejects_bad_names_naming_the_field(stem, field):
    with pytest.raises(ValueError, match=field):
        parse_clip_name(stem)


def test_twelve_sentences_six_emotions():
    assert sorted(SENTENCES) == sorted("DFA IEO IOM ITH ITS IWL IWW MTI TAI TIE TSI WSI".split())
    assert EMOTIONS == ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
