"""Published instance-level results (I2T R@1/5/10, T2I R@1/5/10, mR, in percent) on the test splits this
project uses, printed beside reproduce.py's instance-level table. Numbers as published, not run here;
"-" where a source gives only mR."""
from __future__ import annotations

SOURCES = {"galr": "GaLR repository, results figure", "pir": "PIR repository README",
           "remoteclip": "RemoteCLIP repository, Table 2"}

# One row a line: method | features | i2t R@1 R@5 R@10 | t2i R@1 R@5 R@10 | mR | source (a key of SOURCES)
TABLES = {
    "rsicd_precomp": """
        VSE++        |                        | 3.38 9.51 17.46   | 2.82 11.32 18.10  | 10.43 | galr
        SCAN i2t     |                        | 5.85 12.89 19.84  | 3.71 16.40 26.73  | 14.23 | galr
        MTFN         |                        | 5.02 12.52 19.74  | 4.90 17.17 29.49  | 14.81 | galr
        AMFMN-fusion | ResNet-50              | 5.39 15.08 23.40  | 4.90 18.28 31.44  | 16.42 | galr
        GaLR         | ResNet-18, GRU         | 6.59 19.85 31.04  | 4.69 19.48 32.13  | 18.96 | galr
        SWAN         | ResNet-50              | 7.41 20.13 30.86  | 5.56 22.26 37.41  | 20.61 | pir
        PIR          | Swin + ResNet-50, BERT | 9.88 27.26 39.16  | 6.97 24.56 38.92  | 24.46 | pir
    """,
    "ucm_precomp": """
        VSE++        | VGG19                  | 12.38 44.76 65.71 | 10.10 31.80 56.85 | 36.93 | remoteclip
        SCAN         | ResNet-101             | -                 | -                 | 43.43 | remoteclip
        MTFN         |                        | -                 | -                 | 44.65 | remoteclip
        LW-MRC-u     |                        | -                 | -                 | 45.35 | remoteclip
        AMFMN        | ResNet-50              | 16.67 45.71 68.57 | 12.86 53.24 79.43 | 46.08 | remoteclip
    """,
}


def _recalls(cell: str) -> tuple[float, ...] | None:
    return None if cell == "-" else tuple(float(value) for value in cell.split())


def published_rows(data_name: str) -> list[dict]:
    """The published rows for a dataset (empty when none are known): method, features, i2t and t2i
    (R@1, R@5, R@10) or None, mR and source."""
    rows = []
    for line in TABLES.get(data_name, "").strip().splitlines():
        method, features, i2t, t2i, mean_recall, source = (cell.strip() for cell in line.split("|"))
        rows.append({"method": method, "features": features, "i2t": _recalls(i2t), "t2i": _recalls(t2i),
                     "mR": float(mean_recall), "source": SOURCES[source]})
    return rows
