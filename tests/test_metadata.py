"""The shipped CREMA-D metadata joins as the SPEC states."""

from collections import Counter

from manifests import metadata
from manifests.schema import parse_clip_name


def test_demographics_91_actors_48_male_43_female():
    demo = metadata.demographics()
    assert sorted(demo) == list(range(1001, 1092))
    assert Counter(d["sex"] for d in demo.values()) == {"Male": 48, "Female": 43}


def test_every_clip_has_a_stimulus_number_and_votes():
    stimuli = metadata.stimulus_numbers()
    votes = metadata.crowd_votes()
    assert len(stimuli) == 7442 and set(votes) == set(stimuli)
    emotions = Counter(parse_clip_name(c).emotion for c in stimuli)
    assert emotions == {"ANG": 1271, "DIS": 1271, "FEA": 1271, "HAP": 1271, "SAD": 1271, "NEU": 1087}


def test_human_majority_vote_accuracy_matches_published_figures():
    votes = metadata.crowd_votes()
    acc = {
        m: sum(v[m].correct(parse_clip_name(c).emotion) for c, v in votes.items()) / len(votes)
        for m in ("voice", "face", "audiovisual")
    }
    assert round(acc["voice"] * 100, 1) == 41.6
    assert round(acc["face"] * 100, 1) == 66.3
    assert round(acc["audiovisual"] * 100, 1) == 72.2


def test_tied_votes_keep_every_emotion_and_count_as_wrong():
    tie = next(v["voice"] for v in metadata.crowd_votes().values() if len(v["voice"].emotions) > 1)
    assert len(tie.levels) == len(tie.emotions)
    assert not any(tie.correct(e) for e in tie.emotions)


def test_official_media_list_has_every_file_of_three_folders():
    media = metadata.official_media()
    assert len(media) == 3 * 7442
    assert media["VideoFlash/1064_IEO_DIS_MD.flv"].size > 8_000_000  # the real 8.5 MB outlier
    assert media["VideoFlash/1076_MTI_NEU_XX.flv"].size < 40_000  # the near-empty clip
