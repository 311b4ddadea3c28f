"""Regenerate sample_data/mixed-models.xlsx: `python sample_data/make_mixed.py` (needs openpyxl).

One sheet, two models chosen per row by a Model column, written the way a marketing
team's workbook looks (headers with capitals and spaces, a notes column, typed cells):
Seedance 1.5 Pro text-to-video (with its generate_audio field) and Seedance 2.0 Fast
image-to-video, whose Reference images cells are JSON arrays: for an array field the
list is the value, one request each. The last row breaks 2.0's rule that frame images
do not go together with reference images, on purpose.
"""

from pathlib import Path

import openpyxl

T2V, I2V = "bytedance/seedance-1.5-pro-t2v", "bytedance/seedance-2.0-fast-i2v"
HEADER = ["ID", "Model", "Prompt", "Resolution", "Duration", "Generate audio", "Reference images",
          "First frame image", "Notes"]
ROWS = [
    ["mx-01", T2V, "A lighthouse at dusk, waves crashing, gulls calling", "720p", 5, True, None, None, "audio on"],
    ["mx-02", T2V, "A quiet library, dust drifting in a sunbeam", "1080p", 6, False, None, None, "silent"],
    ["mx-03", I2V, "The product turns slowly on its stand, studio light",
     "720p", 5, None, '["https://example.com/shoe-front.png", "https://example.com/shoe-side.png"]', None, "two refs"],
    ["mx-04", I2V, "The scene comes alive: leaves start to move", "480p", 4, None, None,
     "https://example.com/forest.png", "from a first frame"],
    ["mx-05", I2V, "Both a first frame and references (not allowed together)", "720p", 5, None,
     '["https://example.com/a.png"]', "https://example.com/b.png", "invalid on purpose"],
]

book = openpyxl.Workbook()
sheet = book.active
sheet.title = "Campaign"
sheet.append(HEADER)
for row in ROWS:
    sheet.append(row)
book.save(Path(__file__).with_name("mixed-models.xlsx"))
print("wrote", Path(__file__).with_name("mixed-models.xlsx"))
