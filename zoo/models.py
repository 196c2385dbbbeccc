"""Imports every family module so its models register. Add one line per new family file."""
import zoo.vision.nextvit  # noqa: F401
import zoo.vision.mobiledets  # noqa: F401
import zoo.snn.iir_snn  # noqa: F401
import zoo.language.lfm2  # noqa: F401
import zoo.language.nemotron_flash  # noqa: F401
import zoo.vision.fastvit  # noqa: F401
import zoo.vision.fmvit  # noqa: F401
import zoo.vision.mobileclip  # noqa: F401
import zoo.vision.pp_mobileseg  # noqa: F401
import zoo.vision.yolov10  # noqa: F401
import zoo.vision.doclayout_yolo  # noqa: F401
