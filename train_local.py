"""Train the local-level subnetwork of M2HSE: `python train_local.py --help` lists the flags."""
from errors import report_errors
from trainer import main

if __name__ == "__main__":
    report_errors(main)("local")
