from falconet.cli import main

main()
