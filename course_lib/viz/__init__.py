"""Lesson helpers: the figures, tables and widgets the notebooks show, one module per lesson topic.

They draw and measure; the ideas themselves live one level up (``course_lib.guidance`` is
classifier-free guidance, ``course_lib.viz.guidance`` the plots lesson 4 makes of it).
"""
