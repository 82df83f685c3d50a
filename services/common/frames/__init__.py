"""How frames travel between the services: their pixel layouts (pixel_formats), the FrameBatch wire format
(frame_wire), numpy packing and regrouping (frame_codec), the frame-carrying calls' codecs (frame_streams) and the
receive buffers (frame_allocator)."""
