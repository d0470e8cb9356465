//! V4L2 frame formats (YUYV → RGB, UVC MJPEG without Huffman tables): written by the V4L2
//! source's author.
