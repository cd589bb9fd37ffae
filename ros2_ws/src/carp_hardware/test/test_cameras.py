"""Cameras: the policy-image function, clock mapping, the RealSense / UVC backends on fakes with
the real libraries' names (unplug, replug, stall), and the twin's threaded renders."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from carp_hardware.cameras import (
    CameraError,
    ClockMapper,
    RealSenseCamera,
    RealSenseConfig,
    SimCamera,
    UVCCamera,
    UVCConfig,
    make_camera,
)
from carp_hardware.cameras.fakes import FakeCV2, FakeDevice, FakeRealSense
from carp_policy.images import crop_box, fit_image, scale_intrinsics


def wait_until(cond, timeout=3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


# ------------------------------------------------------------------ the one resize
def test_fit_image_area_resizes_640x480_and_centre_crops_wide_frames() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = fit_image(img)
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    want = img.reshape(120, 4, 160, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(out.astype(float) - want).max() <= 1.0  # a 4x area average, rounded
    assert fit_image(out) is out  # already the policy's size: untouched
    assert crop_box((720, 1280), (120, 160)) == (0, 160, 720, 960)  # 16:9 loses columns, not rows
    wide = np.zeros((720, 1280, 3), np.uint8)
    wide[:, 160:1120] = 200  # only the part the crop keeps is bright
    assert fit_image(wide).min() == 200
    with pytest.raises(ValueError, match="uint8"):
        fit_image(img.astype(np.float32))


def test_scaled_intrinsics_project_like_the_resized_image() -> None:
    K = np.array([[600.0, 0, 330.0], [0, 600.0, 250.0], [0, 0, 1]])
    K2 = scale_intrinsics(K, (720, 1280), (120, 160))
    p = np.array([0.05, -0.03, 0.7])
    u, v = (K @ p)[:2] / p[2]
    u2, v2 = (K2 @ p)[:2] / p[2]
    top, left, ch, cw = crop_box((720, 1280), (120, 160))
    assert u2 == pytest.approx((u - left + 0.5) * 160 / cw - 0.5)
    assert v2 == pytest.approx((v - top + 0.5) * 120 / ch - 0.5)


def test_clock_mapper_recovers_the_offset_and_never_runs_backwards() -> None:
    rng = np.random.default_rng(1)
    m = ClockMapper(window=100)
    out = []
    for i in range(200):
        capture = 10.0 + i / 30
        arrival = capture + 0.004 + rng.exponential(0.003)  # transport delay: a floor plus jitter
        out.append(m(capture - 500.0, arrival))  # the device clock is 500 s behind
    out = np.array(out)
    assert np.all(np.diff(out) >= 0)
    assert np.abs(out[50:] - (10.0 + np.arange(50, 200) / 30 + 0.004)).max() < 1e-3


# ------------------------------------------------------------------ RealSense
def test_realsense_streams_with_host_stamps_intrinsics_and_fixed_exposure() -> None:
    dev = FakeDevice("123622270811", clock_offset=1234.5)
    rs = FakeRealSense([dev])
    cam = RealSenseCamera("wrist", RealSenseConfig(serial=dev.serial, exposure_us=8000, depth=True), rs=rs)
    with cam:
        assert wait_until(lambda: len(cam.buffer) >= 5)
        s = cam.latest(max_age=0.1)
        assert s.value.shape == (480, 640, 3) and s.value.dtype == np.uint8
        # capture time on the host clock: about (arrival - latency), not the device's 1234 s offset
        assert -0.005 < time.monotonic() - s.t < 0.1
        assert rs.options[(dev.serial, "option.enable_auto_exposure")] == 0
        assert rs.options[(dev.serial, "option.exposure")] == 8000
        info = cam.info()
        assert info.serial == dev.serial and info.K[0][0] == pytest.approx(576.0) and info.source == "device"
        assert info.to_camera_info_msg()["k"][2] == pytest.approx(319.5)
        assert cam.depth_buffer.latest().value.dtype == np.float32
        assert cam.depth_buffer.latest().value[0, 0] == pytest.approx(0.5)  # 500 * 1 mm
        assert cam.status()["fps"] > 15


def test_realsense_auto_exposure_drops_settling_frames() -> None:
    dev = FakeDevice("1")
    rs = FakeRealSense([dev])
    cam = RealSenseCamera("scene", RealSenseConfig(serial="1", settle_frames=6), rs=rs)
    with cam:
        assert rs.options[("1", "option.enable_auto_exposure")] == 1
        assert wait_until(lambda: len(cam.buffer) >= 1)
        assert cam.buffer.earliest().value[0, 0, 0] > 6  # frames 1..6 were not delivered


def test_realsense_unplug_mid_stream_refuses_old_frames_then_reconnects() -> None:
    dev = FakeDevice("42")
    cam = RealSenseCamera("wrist", RealSenseConfig(serial="42", settle_frames=0, timeout_ms=100),
                          rs=FakeRealSense([dev]), reconnect_s=0.05)  # fmt: skip
    with cam:
        assert wait_until(lambda: len(cam.buffer) >= 3)
        dev.plugged = False
        time.sleep(0.3)
        with pytest.raises(CameraError, match=r"old.*unplugged"):
            cam.latest(max_age=0.1)
        n = cam.frames
        dev.plugged = True
        assert wait_until(lambda: cam.frames > n + 3)
        assert cam.latest(max_age=0.1) is not None and cam.reconnects >= 1


def test_realsense_stalled_stream_is_refused_with_the_reason() -> None:
    dev = FakeDevice("7")
    cam = RealSenseCamera("wrist", RealSenseConfig(serial="7", settle_frames=0, timeout_ms=100),
                          rs=FakeRealSense([dev]))  # fmt: skip
    with cam:
        assert wait_until(lambda: len(cam.buffer) >= 2)
        dev.stalled = True
        time.sleep(0.25)
        with pytest.raises(CameraError, match="stalled"):
            cam.latest(max_age=0.1)
        dev.stalled = False
        assert wait_until(lambda: _fresh(cam))


def _fresh(cam) -> bool:
    try:
        cam.latest(max_age=0.1)
        return True
    except CameraError:
        return False


def test_realsense_wrong_serial_names_the_ones_found() -> None:
    cam = RealSenseCamera("wrist", RealSenseConfig(serial="999"), rs=FakeRealSense([FakeDevice("1")]))
    with pytest.raises(CameraError, match=r"serial 999 \(found \['1'\]\)"):
        cam.start()
    with pytest.raises(ValueError, match="serial"):
        RealSenseCamera("wrist", RealSenseConfig(), rs=FakeRealSense([]))


# ------------------------------------------------------------------ UVC
def test_uvc_mjpg_bgr_to_rgb_fixed_exposure_unplug_and_replug() -> None:
    dev = FakeDevice("uvc", clock_offset=0.0)
    cv2 = FakeCV2({0: dev})
    cam = make_camera(
        "scene", {"kind": "uvc", "uvc": {"device": "0", "exposure": 150}}, cv2=cv2, reconnect_s=0.05
    )
    assert isinstance(cam, UVCCamera)
    with cam:
        assert wait_until(lambda: len(cam.buffer) >= 3)
        s = cam.latest(max_age=0.1)
        assert s.value[0, 0, 1] == 80 and s.value[0, 0, 2] == 0  # RGB again, not OpenCV's BGR
        assert -0.005 < time.monotonic() - s.t < 0.1
        props = cam._cap.props
        assert props[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")
        assert props[cv2.CAP_PROP_AUTO_EXPOSURE] == 1 and props[cv2.CAP_PROP_EXPOSURE] == 150
        assert cam._cap.api == cv2.CAP_V4L2
        dev.plugged = False
        time.sleep(0.3)
        assert not _fresh(cam)
        dev.plugged = True
        assert wait_until(lambda: _fresh(cam), 5.0) and cam.reconnects >= 1
        with pytest.raises(CameraError, match="calibrate it"):
            cam.info()


def test_uvc_wrong_resolution_is_refused() -> None:
    dev = FakeDevice("uvc", width=1280, height=720)
    cv2 = FakeCV2({0: dev})
    cam = UVCCamera("scene", UVCConfig(device="0"), cv2=cv2)
    orig = cv2.VideoCapture.set

    def stubborn(self, prop, value):  # a camera that ignores the asked width
        return True if prop == cv2.CAP_PROP_FRAME_WIDTH else orig(self, prop, value)

    cv2.VideoCapture.set = stubborn
    with pytest.raises(CameraError, match="asked for 640x480"):
        cam.start()


# ------------------------------------------------------------------ the twin
def test_twin_cameras_render_in_threads_what_the_collector_records() -> None:
    from carp_sim.env import SimCell

    env = SimCell("cup")
    obs = env.reset(0)
    lock = threading.Lock()
    cams = [SimCamera(c, env.model, env.data, lock, size=(120, 160), fps=30) for c in ("wrist", "scene")]
    try:
        for c in cams:
            c.start()
        assert wait_until(lambda: all(len(c.buffer) >= 4 for c in cams))
        for c in cams:
            # the same image the twin's observe() (what carp-sim collect records) renders
            assert np.array_equal(c.latest(max_age=0.1).value, obs.images[c.name])
            assert c.info().K[0][0] == pytest.approx(60 / np.tan(np.radians(c.model.cam(c.name).fovy[0]) / 2))
            ts = np.array([s.t for s in list(c.buffer._items)])
            assert 0.02 < np.median(np.diff(ts)) < 0.05  # ~30 fps on the host clock
        cams[0].paused = True
        time.sleep(0.25)
        with pytest.raises(CameraError, match="old"):
            cams[0].latest(max_age=0.1)
    finally:
        for c in cams:
            c.stop()
        env.close()
