from loopline.launch import entry_point

entry_point()
