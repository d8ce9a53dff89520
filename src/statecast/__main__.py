from statecast.cli import main

main()
