from frankenmoe.cli import console_main

console_main()
