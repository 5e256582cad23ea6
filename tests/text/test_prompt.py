import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vaemo_dist.text.prompt import PROMPTS_DIR, MalformedAnswer, load_prompt, parse_answer

ANSWER = {"facial": "a frown", "vocal": "low voice", "agreement": "agree", "emotion": "sad",
          "intensity": "Medium", "description": "A moderately sad person with a frown and a low voice."}


def test_template_is_versioned_and_renders_both_modes():
    t = load_prompt()
    assert t.version == "affect_cot_v1" and (PROMPTS_DIR / "affect_cot_v1.yaml").is_file()
    assert t.required_keys == ("facial", "vocal", "agreement", "emotion", "intensity", "description")
    assert len(t.sha256) == 64
    system, user = t.render(n_frames=4, duration=3.2, with_audio=True)
    assert "JSON" in system and "4 video frames and the audio track" in user and "3.2-second" in user
    assert user.index("facial") < user.index("vocal") < user.index("agreement") < user.index("description")
    _, user = t.render(n_frames=4, duration=3.2, with_audio=False)
    assert "No audio is attached" in user and "$" not in user


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: f"```json\n{s}\n```",
    lambda s: f"Let me think.\n```\n{s}\n```\nDone.",
    lambda s: f"Here is my analysis: {s} Hope this helps.",
])
def test_parse_tolerates_fences_and_prose(wrap):
    out = parse_answer(wrap(json.dumps(ANSWER)), load_prompt())
    assert out["emotion"] == "sad" and out["intensity"] == "medium"


@pytest.mark.parametrize("text", [
    "",
    "The person is sad.",
    '{"facial": "a frown", "emotion": "sad"',
    json.dumps({k: v for k, v in ANSWER.items() if k != "description"}),
    json.dumps({**ANSWER, "description": "  "}),
    json.dumps({**ANSWER, "facial": ["a frown", "tears"]}),
    json.dumps({**ANSWER, "emotion": None}),
])
def test_parse_rejects_malformed(text):
    with pytest.raises(MalformedAnswer):
        parse_answer(text, load_prompt())


def test_prompts_ship_inside_the_wheel(tmp_path):
    # A wheel install has no checkout: the prompt files must be package data, found next to the module.
    # The wheel is built from a copy, so the checkout gets no build/ folder.
    repo, src = Path(__file__).resolve().parents[2], tmp_path / "src"
    for name in ("vaemo_dist", "kernels"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vaemo_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vaemo_dist/text/prompts/affect_cot_v1.yaml" in names
