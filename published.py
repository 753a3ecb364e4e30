"""Published instance-level results (I2T R@1/5/10, T2I R@1/5/10, mR, in percent) on the test splits this
project uses, printed beside reproduce.py's instance-level table. Numbers as published, not run here;
None where a source gives only mR."""
from __future__ import annotations

GALR = "GaLR repository, results figure"
PIR = "PIR repository README"
REMOTECLIP = "RemoteCLIP repository, Table 2"

# data name -> rows: method, features, i2t (R@1, R@5, R@10), t2i (R@1, R@5, R@10), mR, source
PUBLISHED: dict[str, list[dict]] = {
    "rsicd_precomp": [
        {"method": "VSE++", "features": "", "i2t": (3.38, 9.51, 17.46), "t2i": (2.82, 11.32, 18.10),
         "mR": 10.43, "source": GALR},
        {"method": "SCAN i2t", "features": "", "i2t": (5.85, 12.89, 19.84), "t2i": (3.71, 16.40, 26.73),
         "mR": 14.23, "source": GALR},
        {"method": "MTFN", "features": "", "i2t": (5.02, 12.52, 19.74), "t2i": (4.90, 17.17, 29.49),
         "mR": 14.81, "source": GALR},
        {"method": "AMFMN-fusion", "features": "ResNet-50", "i2t": (5.39, 15.08, 23.40),
         "t2i": (4.90, 18.28, 31.44), "mR": 16.42, "source": GALR},
        {"method": "GaLR", "features": "ResNet-18, GRU", "i2t": (6.59, 19.85, 31.04), "t2i": (4.69, 19.48, 32.13),
         "mR": 18.96, "source": GALR},
        {"method": "SWAN", "features": "ResNet-50", "i2t": (7.41, 20.13, 30.86), "t2i": (5.56, 22.26, 37.41),
         "mR": 20.61, "source": PIR},
        {"method": "PIR", "features": "Swin + ResNet-50, BERT", "i2t": (9.88, 27.26, 39.16),
         "t2i": (6.97, 24.56, 38.92), "mR": 24.46, "source": PIR},
    ],
    "ucm_precomp": [
        {"method": "VSE++", "features": "VGG19", "i2t": (12.38, 44.76, 65.71), "t2i": (10.10, 31.80, 56.85),
         "mR": 36.93, "source": REMOTECLIP},
        {"method": "SCAN", "features": "ResNet-101", "i2t": None, "t2i": None, "mR": 43.43, "source": REMOTECLIP},
        {"method": "MTFN", "features": "", "i2t": None, "t2i": None, "mR": 44.65, "source": REMOTECLIP},
        {"method": "LW-MRC-u", "features": "", "i2t": None, "t2i": None, "mR": 45.35, "source": REMOTECLIP},
        {"method": "AMFMN", "features": "ResNet-50", "i2t": (16.67, 45.71, 68.57), "t2i": (12.86, 53.24, 79.43),
         "mR": 46.08, "source": REMOTECLIP},
    ],
}


def published_rows(data_name: str) -> list[dict]:
    """The published rows for a dataset (empty when none are known)."""
    return PUBLISHED.get(data_name, [])
