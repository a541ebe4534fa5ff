"""Measure Neural Collapse (NC1-NC4), accuracy, cosine margins and nuclear ratio on every
checkpoint of a run directory; write <run>/info.pkl and <run>/test_log.txt.

    python validate_NC.py --load_path model_weights/<uid>
    python validate_NC.py --load_path model_weights/<uid> --measures all --layers

--measures adds the other NC measures of the literature (nc.MEASURES) to info.pkl; --layers records
NC1, tr(Sigma_W)/tr(Sigma_B) and the NCC agreement at every layer (layer_taps), in the same pass.

The model and data flags are read from the run's args.json; flags given here must agree with them.
Each checkpoint's results are kept in <run>/nc_results/ as they are computed, keyed to everything
they depend on (the checkpoint file, the data, the metric code's version), so a rerun (after a
crash, or while the run is still training) only evaluates what is new or changed. info.pkl is
rebuilt from them, and keeps what it held of epochs that can be neither reused nor measured again.
"""
from nclib import validation
from nclib.cli import one_line_warnings, run_main


def main(argv=None):
    return validation.main(argv)


if __name__ == "__main__":
    one_line_warnings()
    run_main(main)
