#!/usr/bin/python3
"""A GStreamer RTSP server on 127.0.0.1 for the RTSP camera tests (Debian packages python3-gi,
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,bad,ugly}).

Usage: rtsp_server.py PORT [SECONDS]
Mount points: /h264 (videotestsrc → x264enc, RTP H.264) and /mjpeg (videotestsrc → jpegenc,
RTP JPEG), 320x240 at 10 fps. Prints "ready" once listening; exits after SECONDS (default 120)
so that a test that forgets it cannot leave it running.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

SOURCE = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1"
PIPELINES = {
    "/h264": f"( {SOURCE} ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )",
    "/mjpeg": f"( {SOURCE} ! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26 )",
}


def main():
    port = sys.argv[1]
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 120
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    mounts = server.get_mount_points()
    for path, launch in PIPELINES.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(True)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    loop = GLib.MainLoop()
    GLib.timeout_add_seconds(seconds, loop.quit)
    loop.run()


if __name__ == "__main__":
    main()
