"""Write batch/specs/*.json from the facts file ../shared/api/models/seedance-family.json.

Run by hand when the facts change (CI does not need ../shared):

    python tools/specs_from_family.py ../shared/api/models/seedance-family.json

Each spec has the shape of the provider's per-model schema document
(https://www.modellix.ai/models/{provider}/{model}/api_schema): ``servers[0].url`` and
``post.requestBody.content."application/json".schema``, plus our ``x-seedance-batch``
block: kind, completeness, source date, sources, and the named cross-field rules that a
JSON Schema cannot say. Only fields the facts file lists are written; nothing is
invented. Models known by name only are not shipped as specs: their names go to
``batch/specs/_names_only.json`` (``models list`` shows them). Facts read later from the
provider's repositories (:data:`FROM_REPOSITORIES`) replace the facts file's entry of a model.

Each field also gets ``x-aliases`` from :data:`ALIASES`: the names people give that
parameter in a spreadsheet header (after units in parentheses are dropped and case,
spaces and hyphens are normalised, ``batch.models.normalize_name``). They are ours, not
the provider's, and live in the spec so that the header matching, the job-file checks
and the README's synonym table read one list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHIP = ("full", "nearly complete", "partial")
SOURCE_DATE = "2026-11-28"  # the facts file: "as far as they could be read on 2026-11-28"
REPOS_DATE = "2026-12-06"  # the provider's repositories, read again for issue 20
SKILL = "github:Modellix/modellix-skill HEAD 4f88a74 (2026-07-16)"
PLUGIN = "github:Modellix/modellix-plugin HEAD 5415d3c (2026-08-12)"

# What the provider's repositories state beyond the facts file, per model: these replace
# the facts file's entry of the same slug. Only what a source states: 2.0 Mini T2V's
# examples send `{"prompt": ...}` and say "`prompt` required"; no other field of it is
# stated anywhere, so its spec is "partial" and a column for any other field is an error
# naming the model. The route is the skill's documented REST form for every model
# (capability-matrix.md: `POST /api/v1/{provider}/{model_id}/async`; rest-playbook.md:
# base `https://api.modellix.ai/api/v1`).
FROM_REPOSITORIES: dict[str, dict] = {
    "bytedance/seedance-2.0-mini-t2v": {
        "slug": "bytedance/seedance-2.0-mini-t2v", "kind": "t2v", "confidence": "partial",
        "fields": {"prompt": {"type": "string", "required": True}},
        "submit_urls": ["https://api.modellix.ai/api/v1/bytedance/seedance-2.0-mini-t2v/async"],
        "rules": [],
        "missing": "Only `prompt` is stated (required); every other field, the prompt's length limit and the "
                   "response are not stated in any source read. Route from the skill's REST form "
                   "(POST /api/v1/{provider}/{model_id}/async on https://api.modellix.ai).",
        "sources": [
            f"{SKILL}: modellix-skill/SKILL.md (Quick Examples, 'T2V (default model) - prompt required'), "
            "references/capability-matrix.md (Default Models; REST route form), references/rest-playbook.md "
            "(base URL; default T2V slug), scripts/README.md",
            f"{PLUGIN}: commands/video.md (text only -> this model, body {{\"prompt\": ...}}), "
            "skills/modellix/references/capability-matrix.md",
        ],
        "source_date": REPOS_DATE,
    },
}

# The provider's default model per kind "when the user omits a model": the plugin's
# capability matrix (newest, 2026-08-12; its CHANGELOG moved V2V from 2.0 V2V to 2.0 Fast
# V2V), which agrees with the skill's for T2V and I2V.
PROVIDER_DEFAULTS = {
    "bytedance/seedance-2.0-mini-t2v": "t2v",
    "bytedance/seedance-2.0-fast-i2v": "i2v",
    "bytedance/seedance-2.0-fast-v2v": "v2v",
}
DEFAULTS_SOURCE = (f"{PLUGIN}: skills/modellix/references/capability-matrix.md 'Default Models'; "
                   f"{SKILL}: modellix-skill/references/capability-matrix.md (V2V there: bytedance/seedance-2.0-v2v)")
NAMES_ONLY = "_names_only.json"  # models known by name only: listed by `models list`, never validated against
KEYS = ("type", "enum", "minimum", "maximum", "minLength", "maxLength", "items", "minItems", "maxItems", "default")
# Rules the facts state in words, as the validator's named rules (batch/validate.py RULES).
RULES = {
    "frames must equal 25 + 4n (29..289)": "frames_25_plus_4n",
    "frames (29..289) overrides duration and should be 25+4n (INFERRED from the 1.0-lite-t2v page; not stated on this "
    "page)": "frames_25_plus_4n",
    "at least one of first_frame_image or last_frame_image is required": "first_or_last_frame_image",
    "first_frame_image and last_frame_image must not be combined with reference_images": "frame_images_not_with_references",
}

# Header synonyms per field, normalised (lower case, ``_`` for spaces). One synonym names
# one field in every model, and never another field's own name (tests/test_headers_and_records.py).
# Deliberately narrow: a word that is often an ordinary column ("text", "notes", "audio",
# "image") is left out, since a synonym makes its column a sent parameter.
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt_text", "text_prompt", "video_prompt"),
    "ratio": ("aspect_ratio", "aspect", "video_ratio", "ratio_w_h", "frame_ratio"),
    "resolution": ("video_resolution", "res"),
    "duration": ("length", "video_length", "clip_length", "duration_s", "duration_seconds", "duration_sec",
                 "length_s", "length_seconds", "seconds", "secs", "clip_duration"),
    "frames": ("frame_count", "num_frames", "number_of_frames", "n_frames"),
    "seed": ("random_seed",),
    "camera_fixed": ("fixed_camera", "static_camera", "locked_camera", "camera_locked", "lock_camera", "fixed_cam",
                     "static_shot", "static"),
    "service_tier": ("tier",),
    "execution_expires_after": ("expires_after", "expiry_seconds"),
    "return_last_frame": ("return_last_frame_image",),
    "generate_audio": ("with_audio", "audio_on", "audio", "sound", "with_sound"),
    "first_frame_image": ("first_frame", "first_frame_url", "start_frame", "start_image"),
    "last_frame_image": ("last_frame_url", "end_frame", "end_image"),
    "reference_images": ("reference_image_urls", "ref_images"),
    "video_urls": ("video_url", "reference_videos", "source_videos"),
    "audio_urls": ("audio_url", "reference_audios"),
}


def spec_of(model: dict) -> dict:
    properties, required = {}, []
    for name, field in model["fields"].items():
        prop = {k: field[k] for k in KEYS if k in field}
        if field.get("unit"):
            prop["description"] = f"{field['unit']}"
        if field.get("inferred"):
            prop["x-inferred"] = True
        if ALIASES.get(name):
            prop["x-aliases"] = list(ALIASES[name])
        if field.get("required") is True:
            required.append(name)
        elif isinstance(field.get("required"), str):
            prop["x-required"] = field["required"]  # "unknown", "likely": not enforced
        properties[name] = prop
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    rules = sorted({RULES[r] for r in model["rules"] if r in RULES})
    ours = {
        "slug": model["slug"], "kind": model["kind"],
        "completeness": "complete" if model["confidence"] == "full" else model["confidence"],
        "source_date": model.get("source_date", SOURCE_DATE), "sources": model["sources"], "rules": rules,
        "notes": [r for r in model["rules"] if r not in RULES] + ([model["missing"]] if model.get("missing") else []),
    }
    if model["slug"] in PROVIDER_DEFAULTS:
        ours["provider_default"] = PROVIDER_DEFAULTS[model["slug"]]
        ours["provider_default_source"] = DEFAULTS_SOURCE
    return {
        "x-seedance-batch": ours,
        "servers": [{"url": model["submit_urls"][0]}],
        "post": {"requestBody": {"content": {"application/json": {"schema": schema}}}},
    }


def main(facts: Path, out: Path) -> None:
    family = json.loads(facts.read_text())
    names_only = []
    for model in family["models"]:
        model = FROM_REPOSITORIES.get(model["slug"], model)
        if model["confidence"] not in SHIP or not model["submit_urls"]:
            names_only.append({"slug": model["slug"], "kind": model["kind"], "why": model.get("missing", "")})
            continue
        name = model["slug"].replace("/", "__") + ".json"
        (out / name).write_text(json.dumps(spec_of(model), indent=1, ensure_ascii=False) + "\n")
        print("wrote", out / name)
    index = {"about": "Seedance models the sources name without stating their fields (not shipped as specs); "
                      f"facts file of {SOURCE_DATE}, provider repositories read {REPOS_DATE}.",
             "models": names_only}
    (out / NAMES_ONLY).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print("wrote", out / NAMES_ONLY)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent.parent / "batch" / "specs")
