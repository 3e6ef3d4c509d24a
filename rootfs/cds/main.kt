fun main() {
    println("Hello from Kotlin!")
}
